"""What the benchmarks share: each method timed in processes of its own.

A method is a recipe with overrides (or torch.distributed.pipelining's GPipe for
comparison) run by this module in a fresh Python process (``python -m
torch.distributed.run`` for several ranks); it warms up, times its runs and
writes a JSON result. ``best_of`` interleaves rounds of several methods and keeps
each one's fastest, because other processes may share the cores. A reference
timed in a process that hosts mmpipe's threads runs 15-30% slower, so no
method ever shares a process with another.

    python benchmarks/common.py --inner --recipe synthetic --out r.json -- stages=2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLIPS = sorted((ROOT / "tests" / "assets" / "speech").glob("clip*.wav")) + [ROOT / "recipes" / "examples" / "hello.wav"]


# ------------------------------------------------------------------ inside a method's process
def inner(a: argparse.Namespace) -> None:
    """Time one mmpipe method (this process is it, or is rank 0 of it)."""
    import torch

    from mmpipe.api import compile, requests_of

    plan = compile(a.recipe, a.overrides)
    out: dict[str, Any] = {}
    if plan.distributed:
        from mmpipe.launch import run_as_rank

        def drive(p: Any) -> int:
            from mmpipe.runtime.dist_pipeline import DistributedPipeline

            with DistributedPipeline(p) as pipe:
                out.update(timed(pipe, requests_of(p), a.repeat, a.single))
            return 0

        from mmpipe.launch import exit_now

        code = run_as_rank(plan, drive)
        if os.environ.get("RANK") == "0":
            out["threads"] = torch.get_num_threads()
            Path(a.out).write_text(json.dumps(out))
        exit_now(code)  # receiver threads sit in network receives: no interpreter teardown
    elif a.direct:
        out.update(direct(plan, requests_of(plan), a.repeat))
    else:
        from mmpipe.runtime import make_executor

        with make_executor(plan).start() as ex:
            out.update(timed(ex, requests_of(plan), a.repeat, a.single))
    out["threads"] = torch.get_num_threads()
    Path(a.out).write_text(json.dumps(out))


def timed(ex: Any, reqs: list[Any], repeat: int, single: bool) -> dict[str, Any]:
    ex.run(reqs[: max(2, len(reqs) // 4)])  # warm up: threads, allocations, first-call costs
    if single:  # one request at a time: latency
        lats = []
        for r in reqs:
            t0 = time.perf_counter()
            ex.run([r])
            lats.append(time.perf_counter() - t0)
        lats.sort()
        return {"latency_s": lats[len(lats) // 2]}
    best, stats = float("inf"), {}
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = ex.run(reqs)
        dt = time.perf_counter() - t0
        if dt < best and hasattr(ex, "recorder"):
            stats = ex.stats(dt)  # per-stage busy time of the fastest run (benchmarks/balance.py)
        best = min(best, dt)
        assert all(r.ok for r in res), [r.error for r in res if not r.ok][:1]
    return {"wall_s": best, "texts": [r.outputs.get("text") for r in res if r.outputs and "text" in r.outputs], "stats": stats}


def direct(plan: Any, reqs: list[Any], repeat: int) -> dict[str, Any]:
    """The plan's node pieces on the same micro-batches (one request each) in one plain loop:
    no runtime at all (what a pipeline's own overhead is measured against)."""
    from mmpipe.runtime.batch import from_requests
    from mmpipe.runtime.execute import run_unit
    from mmpipe.runtime.routing import build_routes
    from mmpipe.runtime.sequential import SequentialExecutor

    keys = build_routes(plan).input_keys
    with SequentialExecutor(plan) as ex:
        best = float("inf")
        for _ in range(repeat + 1):
            mbs = [from_requests(plan, [r], keys) for r in reqs]
            t0 = time.perf_counter()
            for mb in mbs:
                for st in plan.stages:
                    for u in st.units:
                        mb = run_unit(plan, u, ex.insts[(u.node, u.piece)], mb, st.device)
            best = min(best, time.perf_counter() - t0)
    return {"wall_s": best}


def pippy(a: argparse.Namespace) -> None:
    """torch.distributed.pipelining: the same two matmul stages, GPipe, forward only."""
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)

    class Stage(torch.nn.Module):
        """One synthetic part: the affine map plus one dim x dim product (as ``synthetic.chain``)."""

        def __init__(self, part: int, dim: int) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.w = torch.nn.Parameter(torch.randn(dim, dim, generator=g) / dim**0.5, requires_grad=False)
            self.a, self.b = 1.0 + 0.125 * ((part % 5) + 1), 0.25 * (part + 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.w @ self.w  # noqa: B018  (the workload)
            return x * self.a + self.b

    m, width = a.microbatches, 16
    stage = PipelineStage(Stage(rank, a.dim), rank, 2, torch.device("cpu"), input_args=(torch.zeros(1, width),))
    sched = ScheduleGPipe(stage, n_microbatches=m)
    x = torch.randn(m, width)
    best = float("inf")
    with torch.no_grad():
        for i in range(a.repeat + 1):
            dist.barrier()
            t0 = time.perf_counter()
            sched.step(x) if rank == 0 else sched.step()
            dist.barrier()
            if i:  # the first step warms up (shape inference, buffers)
                best = min(best, time.perf_counter() - t0)
    if rank == 0:
        Path(a.out).write_text(json.dumps({"wall_s": best, "threads": torch.get_num_threads()}))
    dist.destroy_process_group()


# ------------------------------------------------------------------ the driver
def method(name: str, recipe: str, overrides: list[str], threads: int, repeat: int, single: bool = False,
           nproc: int = 1, pippy_args: list[str] | None = None, direct: bool = False) -> dict[str, Any]:
    """Run one method in fresh processes; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        me = [str(Path(__file__).resolve())]  # this module is the inner runner
        if pippy_args is not None:
            args = me + ["--pippy", "--out", str(out), "--repeat", str(repeat), *pippy_args]
        else:
            args = me + ["--inner", "--recipe", recipe, "--out", str(out), "--repeat", str(repeat)] + (["--single"] if single else [])
            args += ["--direct"] if direct else []
            args += ["--"] + overrides
        if nproc > 1:
            args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", f"--log-dir={tmp}/elastic"] + args
        r = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0 or not out.exists():
            raise RuntimeError(f"{name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        return json.loads(out.read_text())


def best_of(rounds: int, methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Interleaved rounds; per method the run with the smallest time."""
    best: dict[str, dict[str, Any]] = {}
    for i in range(rounds):
        for name, spec in methods.items():
            res = method(name, **spec)
            key = "wall_s" if "wall_s" in res else "latency_s"
            if name not in best or res[key] < best[name][key]:
                best[name] = res
            print(f"  round {i + 1}: {name}: {res[key]:.4f} s (load {os.getloadavg()[0]:.2f})", file=sys.stderr)
    return best


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def make_profile(recipe: str, overrides: list[str], out: Path, threads: int = 0, microbatches: int = 3, co_run: bool = False) -> Path:
    """``mmpipe profile`` in a process of its own (``--co-run``: also beside the recipe on
    the other cores); the path of its profile.json."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    r = subprocess.run([sys.executable, "-m", "mmpipe", "profile", recipe, *overrides, f"output_dir={out}", "overwrite=true", "-q",
                        "--microbatches", str(microbatches)] + (["--co-run"] if co_run else []), env=env, capture_output=True, text=True,
                       timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"mmpipe profile {recipe} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return out / "profile.json"


def long_clips(n: int, tmp: Path, seconds: float = 27.0) -> Path:
    """``n`` recordings of about ``seconds`` of speech each (the shipped clips one after another,
    0.25 s apart, starting at a different clip each): full 30-s windows, ~80-100 tokens."""
    import soundfile as sf
    import torch

    from mmpipe.graphs.audio import read_audio

    waves = [read_audio(str(c), 16000) for c in CLIPS]
    gap = torch.zeros(4000)
    for i in range(n):
        parts, total, k = [], 0, i
        while total < seconds * 16000:
            parts += [waves[k % len(waves)], gap]
            total += len(waves[k % len(waves)]) + len(gap)
            k += 1
        sf.write(tmp / f"long{i:02d}.wav", torch.cat(parts)[: int(29 * 16000)].numpy(), 16000, subtype="PCM_16")
    return tmp


def clip_set(n: int, tmp: Path) -> Path:
    """``n`` distinct files: the shipped clips cycled, each later copy with 0.1 s more leading silence."""
    import soundfile as sf
    import torch

    from mmpipe.graphs.audio import read_audio

    for i in range(n):
        src = CLIPS[i % len(CLIPS)]
        w = torch.cat([torch.zeros(1600 * (i // len(CLIPS))), read_audio(str(src), 16000)])
        sf.write(tmp / f"c{i:02d}_{src.stem}.wav", w.numpy(), 16000, subtype="PCM_16")
    return tmp




def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run one benchmark method (used by the benchmarks)")
    ap.add_argument("--inner", action="store_true")
    ap.add_argument("--pippy", action="store_true")
    ap.add_argument("--recipe", default="synthetic")
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--single", action="store_true")
    ap.add_argument("--direct", action="store_true")
    ap.add_argument("--microbatches", type=int, default=32)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    if a.pippy:
        pippy(a)
    else:
        inner(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
