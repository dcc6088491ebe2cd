"""The distributed backend against one process and against torch.distributed.pipelining.

    python benchmarks/distributed.py                 # all three tables (a few minutes)
    python benchmarks/distributed.py --quick         # fewer rounds, smaller runs
    python benchmarks/distributed.py --only matmul   # or whisper, hop

Every method runs in processes of its own (a reference timed in a process that
hosts mmpipe's threads runs slower), rounds interleaved, best wall time kept;
each method warms up inside its process before it is timed.

1. Two compute-bound matmul stages (``synthetic work=matmul``: one dim x dim product per
   stage per micro-batch, micro-batch = 1 request): sequential with 1 and with 2 torch
   threads, the threads backend, the distributed backend (2 ranks x 1 thread) and
   ``torch.distributed.pipelining`` (``PipelineStage`` + ``ScheduleGPipe``, the same two
   stages and micro-batches, 2 ranks x 1 thread). Speed-up against sequential, 1 thread.
2. whisper_stt on 16 clips: threads backend; distributed over 2 ranks; distributed with
   the encoder replicated on both ranks.
3. The cost of a hop between processes, with no-op stages: one micro-batch alone through
   2 stages (latency) and many in a row (throughput), threads vs distributed; the
   distributed run has 2 hops between processes per micro-batch (stage 0 -> stage 1 on
   rank 1 -> results on rank 0).
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
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = ex.run(reqs)
        best = min(best, time.perf_counter() - t0)
        assert all(r.ok for r in res), [r.error for r in res if not r.ok][:1]
    return {"wall_s": best, "texts": [r.outputs.get("text") for r in res if r.outputs and "text" in r.outputs]}


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
           nproc: int = 1, pippy_args: list[str] | None = None) -> dict[str, Any]:
    """Run one method in fresh processes; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        me = [str(Path(__file__).resolve())]
        if pippy_args is not None:
            args = me + ["--pippy", "--out", str(out), "--repeat", str(repeat), *pippy_args]
        else:
            args = me + ["--inner", "--recipe", recipe, "--out", str(out), "--repeat", str(repeat)] + (["--single"] if single else [])
            args += ["--"] + overrides
        if nproc > 1:
            args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] + args
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


def matmul(quick: bool) -> None:
    m, dim, rounds = (16, 384, 2) if quick else (32, 512, 3)
    syn = ["stages=2", "work=matmul", f"dim={dim}", f"requests={m}", "runtime.microbatch_size=1", "batching.max_delay_ms=0"]
    methods = {
        "sequential, 1 thread": dict(recipe="synthetic", overrides=syn + ["runtime=sequential"], threads=1, repeat=3),
        "sequential, 2 threads": dict(recipe="synthetic", overrides=syn + ["runtime=sequential"], threads=2, repeat=3),
        "threads backend (2 torch threads)": dict(recipe="synthetic", overrides=syn, threads=2, repeat=3),
        "distributed, 2 ranks x 1 thread": dict(recipe="synthetic", overrides=syn + ["runtime=distributed", "runtime.nproc=2", "runtime.threads_per_rank=1"],
                                                threads=1, repeat=3, nproc=2),
        "torch.distributed.pipelining GPipe, 2 ranks x 1 thread": dict(recipe="", overrides=[], threads=1, repeat=3, nproc=2,
                                                                       pippy_args=["--microbatches", str(m), "--dim", str(dim)]),
    }
    best = best_of(rounds, methods)
    base = best["sequential, 1 thread"]["wall_s"]
    pp = best["torch.distributed.pipelining GPipe, 2 ranks x 1 thread"]["wall_s"]
    rows = [("method", "wall ms", "vs sequential 1 thread", "vs pipelining")]
    for name, res in best.items():
        rows.append((name, f"{1000 * res['wall_s']:.1f}", f"{base / res['wall_s']:.2f}x", f"{pp / res['wall_s']:.2f}x"))
    print(f"\n## 1. two matmul stages ({m} micro-batches of 1, dim {dim}; best of {rounds} rounds x 3 runs)")
    print(table(rows))


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


def whisper(quick: bool) -> None:
    n, rounds = (8, 1) if quick else (16, 3)
    with tempfile.TemporaryDirectory() as tmp:
        d = clip_set(n, Path(tmp))
        base = [f"input={d}/*.wav", "max_new_tokens=128"]
        dist = ["runtime=distributed", "runtime.nproc=2", "runtime.threads_per_rank=1"]
        methods = {
            "threads backend (2 torch threads)": dict(recipe="whisper_stt", overrides=base, threads=2, repeat=2),
            "distributed, 2 ranks x 1 thread": dict(recipe="whisper_stt", overrides=base + dist, threads=1, repeat=2, nproc=2),
            "distributed, encoder on both ranks": dict(recipe="whisper_stt", overrides=base + dist + ["placement.encoder=[rank0,rank1]"],
                                                       threads=1, repeat=2, nproc=2),
        }
        best = best_of(rounds, methods)
    texts = {name: res["texts"] for name, res in best.items()}
    agree = len({json.dumps(t) for t in texts.values()}) == 1
    ref = best["threads backend (2 torch threads)"]["wall_s"]
    rows = [("method", "wall s", "vs threads backend")]
    for name, res in best.items():
        rows.append((name, f"{res['wall_s']:.3f}", f"{ref / res['wall_s']:.2f}x"))
    print(f"\n## 2. whisper_stt, {n} clips, tiny.en (best of {rounds} rounds x 2 runs; transcripts agree: {agree})")
    print(table(rows))


def hop(quick: bool) -> None:
    m, rounds = (200, 1) if quick else (600, 3)
    noop = ["stages=2", "work=noop", f"requests={m}", "runtime.microbatch_size=1", "batching.max_delay_ms=0"]
    dist = ["runtime=distributed", "runtime.nproc=2", "runtime.threads_per_rank=1"]
    lone = ["stages=2", "work=noop", "requests=40", "runtime.microbatch_size=1", "batching.max_delay_ms=0"]
    methods = {
        "threads, many": dict(recipe="synthetic", overrides=noop, threads=1, repeat=3),
        "distributed, many": dict(recipe="synthetic", overrides=noop + dist, threads=1, repeat=3, nproc=2),
        "threads, one alone": dict(recipe="synthetic", overrides=lone, threads=1, repeat=1, single=True),
        "distributed, one alone": dict(recipe="synthetic", overrides=lone + dist, threads=1, repeat=1, single=True, nproc=2),
    }
    best = best_of(rounds, methods)
    th, di = best["threads, many"]["wall_s"] / m, best["distributed, many"]["wall_s"] / m
    lt, ld = best["threads, one alone"]["latency_s"], best["distributed, one alone"]["latency_s"]
    rows = [("measure", "threads", "distributed", "per hop between processes")]
    rows.append(("one micro-batch alone, latency ms", f"{1000 * lt:.3f}", f"{1000 * ld:.3f}", f"{1000 * (ld - lt) / 2:.3f} ms (+ the in-process hop it replaces)"))
    rows.append((f"{m} in a row, ms per micro-batch", f"{1000 * th:.3f}", f"{1000 * di:.3f}", f"{1000 * di / 2:.3f} ms (2 processes work at once)"))
    print(f"\n## 3. no-op stages: the cost of crossing processes (best of {rounds} rounds)")
    print(table(rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["matmul", "whisper", "hop"], action="append")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pippy", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", default="synthetic", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--microbatches", type=int, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--dim", type=int, default=512, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.inner:
        inner(a)
        return 0
    if a.pippy:
        pippy(a)
        return 0
    import torch

    print(f"# mmpipe distributed benchmark ({'quick' if a.quick else 'full'}; torch {torch.__version__}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f})")
    only = set(a.only or ["matmul", "whisper", "hop"])
    if "matmul" in only:
        matmul(a.quick)
    if "whisper" in only:
        whisper(a.quick)
    if "hop" in only:
        hop(a.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
