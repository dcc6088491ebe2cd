"""The distributed backend against one process and against torch.distributed.pipelining.

    python benchmarks/distributed.py                 # all three tables (a few minutes)
    python benchmarks/distributed.py --quick         # fewer rounds, smaller runs
    python benchmarks/distributed.py --only matmul   # or whisper, hop

Every method runs in processes of its own (a reference timed in a process that
hosts mmpipe's threads runs slower), rounds interleaved, best wall time kept;
each method warms up inside its process before it is timed.

1. Two compute-bound matmul stages (``synthetic work=matmul``: one dim x dim product per
   stage per micro-batch, micro-batch = 1 request): sequential with 1 and with 2 torch
   threads, the threads backend (with the process's 2 threads in each stage, and with
   ``runtime.threads_per_stage=1``), the distributed backend (2 ranks x 1 thread; its
   messages over a Unix socket, as between ranks of one host, and over gloo, as between
   hosts) and
   ``torch.distributed.pipelining`` (``PipelineStage`` + ``ScheduleGPipe``, the same two
   stages and micro-batches, 2 ranks x 1 thread). Speed-up against sequential, 1 thread.
2. whisper_stt on 16 clips: threads backend; distributed over 2 ranks; distributed with
   the encoder replicated on both ranks; ``placement=auto`` (the balancer's cuts, copies and
   ranks, from a profile taken just before with the same settings).
3. The cost of a hop between processes, with no-op stages: one micro-batch alone through
   2 stages (latency) and many in a row (throughput), threads vs distributed (Unix
   socket, and gloo); the
   distributed run has 2 hops between processes per micro-batch (stage 0 -> stage 1 on
   rank 1 -> results on rank 0).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import best_of, clip_set, make_profile, table  # noqa: E402

DIST = ["runtime=distributed", "runtime.nproc=2", "runtime.threads_per_rank=1"]  # 2 ranks x 1 intra-op thread
GLOO = ["runtime.transport=gloo"]  # every message through gloo, as between hosts


def matmul(quick: bool) -> None:
    m, dim, rounds = (16, 384, 2) if quick else (32, 512, 3)
    syn = ["stages=2", "work=matmul", f"dim={dim}", f"requests={m}", "runtime.microbatch_size=1", "batching.max_delay_ms=0"]
    methods = {
        "sequential, 1 thread": dict(recipe="synthetic", overrides=syn + ["runtime=sequential"], threads=1, repeat=3),
        "sequential, 2 threads": dict(recipe="synthetic", overrides=syn + ["runtime=sequential"], threads=2, repeat=3),
        "threads backend (2 torch threads)": dict(recipe="synthetic", overrides=syn, threads=2, repeat=3),
        "threads backend, 1 thread per stage": dict(recipe="synthetic", overrides=syn + ["runtime.threads_per_stage=1"], threads=2, repeat=3),
        "distributed, 2 ranks x 1 thread": dict(recipe="synthetic", overrides=syn + DIST, threads=1, repeat=3, nproc=2),
        "distributed, messages over gloo": dict(recipe="synthetic", overrides=syn + DIST + GLOO, threads=1, repeat=3, nproc=2),
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


def whisper(quick: bool) -> None:
    n, rounds = (8, 1) if quick else (16, 3)
    with tempfile.TemporaryDirectory() as tmp:
        d = clip_set(n, Path(tmp))
        base = [f"input={d}/*.wav", "max_new_tokens=128"]
        prof = make_profile("whisper_stt", base + DIST, Path(tmp) / "profile")
        methods = {
            "threads backend (2 torch threads)": dict(recipe="whisper_stt", overrides=base, threads=2, repeat=2),
            "distributed, 2 ranks x 1 thread": dict(recipe="whisper_stt", overrides=base + DIST, threads=1, repeat=2, nproc=2),
            "distributed, encoder on both ranks": dict(recipe="whisper_stt", overrides=base + DIST + ["placement.encoder=[rank0,rank1]"],
                                                       threads=1, repeat=2, nproc=2),
            "distributed, placement=auto": dict(recipe="whisper_stt", overrides=base + DIST + ["placement=auto", f"profile={prof}"],
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
    lone = ["stages=2", "work=noop", "requests=40", "runtime.microbatch_size=1", "batching.max_delay_ms=0"]
    methods = {
        "threads, many": dict(recipe="synthetic", overrides=noop, threads=1, repeat=3),
        "distributed, many": dict(recipe="synthetic", overrides=noop + DIST, threads=1, repeat=3, nproc=2),
        "gloo, many": dict(recipe="synthetic", overrides=noop + DIST + GLOO, threads=1, repeat=3, nproc=2),
        "threads, one alone": dict(recipe="synthetic", overrides=lone, threads=1, repeat=1, single=True),
        "distributed, one alone": dict(recipe="synthetic", overrides=lone + DIST, threads=1, repeat=1, single=True, nproc=2),
        "gloo, one alone": dict(recipe="synthetic", overrides=lone + DIST + GLOO, threads=1, repeat=1, single=True, nproc=2),
    }
    best = best_of(rounds, methods)
    th, di, gl = (best[f"{k}, many"]["wall_s"] / m for k in ("threads", "distributed", "gloo"))
    lt, ld, lg = (best[f"{k}, one alone"]["latency_s"] for k in ("threads", "distributed", "gloo"))
    rows = [("measure", "threads", "distributed", "per hop between processes", "distributed over gloo", "per hop over gloo")]
    rows.append(("one micro-batch alone, latency ms", f"{1000 * lt:.3f}", f"{1000 * ld:.3f}", f"{1000 * (ld - lt) / 2:.3f} ms (+ the in-process hop it replaces)",
                 f"{1000 * lg:.3f}", f"{1000 * (lg - lt) / 2:.3f} ms"))
    rows.append((f"{m} in a row, ms per micro-batch", f"{1000 * th:.3f}", f"{1000 * di:.3f}", f"{1000 * di / 2:.3f} ms (2 processes work at once)",
                 f"{1000 * gl:.3f}", f"{1000 * gl / 2:.3f} ms"))
    print(f"\n## 3. no-op stages: the cost of crossing processes (best of {rounds} rounds)")
    print(table(rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["matmul", "whisper", "hop"], action="append")
    a = ap.parse_args(argv)
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
