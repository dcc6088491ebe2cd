"""Co-runners for ``mmpipe profile --co-run``: the same recipe, busy on the other cores.

A part that reads much memory per op (a decoder step over a few rows) runs slower while
the other cores run such parts too: they share the memory bus and the last-level cache.
``mmpipe profile --co-run`` times every part a second time while ``co_runners`` keeps
every other core busy with the recipe itself. Each co-runner is a process of its own
(``python -m mmpipe.corun``) that compiles the recipe with the profile's overrides, loads
its weights once and runs the recipe's requests one after another (the sequential
executor, the profile's intra-op threads), over and over, until it is stopped or the
profiling process is gone.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

READY = "mmpipe-corun ready"


@contextmanager
def co_runners(recipe: str, overrides: list[str], n: int, threads: int, timeout_s: float = 900.0) -> Iterator[int]:
    """``n`` co-runner processes of ``recipe`` (a name or path), each running once before this
    yields (so their weights are loaded); stopped and reaped on exit, even after an error.
    RuntimeError when one fails to start (its last output lines say why)."""
    tmp = tempfile.mkdtemp(prefix="mmpipe-corun-")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs: list[subprocess.Popen[str]] = []
    drains: list[threading.Thread] = []
    try:
        for k in range(n):
            args = [sys.executable, "-m", "mmpipe.corun", str(threads), recipe, *overrides, f"output_dir={tmp}/{k}", "overwrite=true"]
            # stdin: a pipe the co-runner watches, so that it exits when this process dies
            procs.append(subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
        for p in procs:
            drains.append(_wait_ready(p, timeout_s))
        yield n
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for t in drains:
            t.join()  # the pipe is at its end: the process is gone
        for p in procs:
            for f in (p.stdin, p.stdout):
                if f is not None:
                    f.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_ready(p: subprocess.Popen[str], timeout_s: float) -> threading.Thread:
    """Read ``p``'s output until it says it is ready; then drain the rest in a thread (a
    full pipe would block it), which is returned."""
    out = p.stdout
    assert out is not None
    tail: list[str] = []
    timer = threading.Timer(timeout_s, p.kill)
    timer.start()
    try:
        for line in out:
            if line.strip() == READY:
                break
            tail = (tail + [line.rstrip()])[-20:]
        else:
            raise RuntimeError(f"a co-runner stopped before it ran the recipe once (exit {p.wait()}):\n" + "\n".join(tail))
    finally:
        timer.cancel()
    def drain() -> None:
        for _ in out:
            pass

    t = threading.Thread(target=drain, name="mmpipe-corun-drain", daemon=True)
    t.start()
    return t


def main(argv: list[str]) -> int:
    """``python -m mmpipe.corun THREADS RECIPE [overrides]``: run the recipe's requests forever."""
    import torch

    from mmpipe.api import open_pipeline, requests_of
    from mmpipe.dsl.compile import compile_recipe

    def orphaned() -> None:  # the profile's end of the pipe closes when it exits, even killed
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=orphaned, daemon=True).start()
    threads, recipe, overrides = int(argv[0]), argv[1], argv[2:]
    torch.set_num_threads(threads)
    plan = compile_recipe(recipe, overrides)
    reqs = requests_of(plan)
    ex = open_pipeline(plan, backend="sequential")
    ex.run(reqs)
    print(READY, flush=True)
    while True:
        ex.run(reqs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
