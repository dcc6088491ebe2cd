"""Measure the pipelined runtime against the theory (ANCHORS.md, "Theory to measure against").

    python benchmarks/runtime.py            # all three tables (about 2-3 minutes)
    python benchmarks/runtime.py --quick    # smaller runs (well under a minute)

1. Sleep stages of equal cost (sleep releases the GIL, so this measures the
   runtime, not the 2 cores): for p = 2, 4, 8 and m = 1, 4, 16, 64 micro-batches,
   throughput over the fill-drain ideal m / ((m+p-1) t) and over the
   slowest-stage bound 1/t, and the measured bubble next to (p-1)/(m+p-1).
   ``t`` is the measured mean stage time (time.sleep overshoots a little).
   Plus steady streaming: completions per second over 1/t once the pipe is full.
2. No-op stages: the runtime's own cost per micro-batch per stage hop, in us:
   at saturation, wall / (m * p) minus the same node pieces run on the same
   micro-batches in one plain loop; and for one micro-batch alone, its
   latency / p minus the same. Python threads share one GIL, so at saturation
   this is CPU cost, not parallel time.
3. Matmul stages (compute-bound, 2 cores): the pipeline against the same stages
   run sequentially in one thread, with 1 and 2 torch intra-op threads.

Tables 2 and 3 run each method in a process of its own (``common.py``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import best_of  # noqa: E402
from common import table as common_table  # noqa: E402

from mmpipe.api import compile, requests_of  # noqa: E402
from mmpipe.runtime.pipeline import Pipeline  # noqa: E402


def plan_for(p: int, m: int, work: str, **extra: Any) -> Any:
    ovs = [f"stages={p}", f"requests={m}", f"work={work}", "runtime.microbatch_size=1", "batching.max_delay_ms=0"]
    ovs += [f"{k}={v}" for k, v in extra.items()]
    return compile("synthetic", ovs)


def timed_run(pipe: Pipeline, reqs: list[Any]) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    res = pipe.run(reqs)
    wall = time.perf_counter() - t0
    assert all(r.ok for r in res), [r.error for r in res if not r.ok][:1]
    return wall, pipe.stats(wall)


def stage_times(stats: dict[str, Any]) -> list[float]:
    return [s["busy_s"] / max(1, s["calls"]) for s in stats["stages"]]


# ---------------------------------------------------------------- table 1
def sleep_table(ps: list[int], ms: list[int], stage_ms: float, repeat: int, stream_m: int) -> list[str]:
    rows = [("p", "m", "wall ms", "thr/ideal", "thr/bound", "bubble", "theory", "diff pp")]
    notes = []
    for p in ps:
        for m in ms:
            plan = plan_for(p, m, "sleep", stage_ms=stage_ms)
            reqs = requests_of(plan)
            with Pipeline(plan) as pipe:
                pipe.run(reqs[:1])  # warm up threads and allocations
                runs = sorted((timed_run(pipe, reqs) for _ in range(repeat)), key=lambda r: r[0])
            wall, stats = runs[len(runs) // 2]
            t = statistics.mean(stage_times(stats))
            ideal = (m + p - 1) * t
            bound = m * max(stage_times(stats))
            theory = 100 * (p - 1) / (m + p - 1)
            rows.append((str(p), str(m), f"{1000 * wall:.1f}", f"{100 * ideal / wall:.1f}%", f"{100 * bound / wall:.1f}%",
                         f"{stats['bubble_pct']:.1f}%", f"{theory:.1f}%", f"{stats['bubble_pct'] - theory:+.2f}"))
        notes.append(steady_stream(p, stream_m, stage_ms))
    return table(rows) + notes


def steady_stream(p: int, m: int, stage_ms: float) -> str:
    """Completion rate once the pipe is full, against the slowest-stage bound."""
    plan = plan_for(p, m, "sleep", stage_ms=stage_ms)
    reqs = requests_of(plan)
    with Pipeline(plan) as pipe:
        pipe.run(reqs[:1])
        pipe.recorder.reset()
        t0 = time.perf_counter()
        stamps = [time.perf_counter() for _ in pipe.stream(reqs)]
        stats = pipe.stats(time.perf_counter() - t0)
    skip = p  # completions while the pipe fills are not steady state
    rate = (len(stamps) - 1 - skip) / (stamps[-1] - stamps[skip])
    t_max = max(stage_times(stats))
    return f"steady streaming p={p}, {m} micro-batches: {rate:.1f} mb/s vs bound 1/t_max = {1 / t_max:.1f} mb/s -> {100 * rate * t_max:.1f}%"


# ---------------------------------------------------------------- table 2
def overhead_table(ps: list[int], m: int, singles: int, rounds: int) -> list[str]:
    """Each method in a process of its own (``common.method``): the pipeline, the same pieces
    in a plain loop, and one micro-batch alone through the pipeline."""
    rows = [("p", "m", "wall ms", "pipeline us/hop", "nodes alone us/hop", "runtime us/hop", "1 mb alone: runtime us/hop")]
    for p in ps:
        base = [f"stages={p}", "work=noop", "runtime.microbatch_size=1", "batching.max_delay_ms=0"]
        best = best_of(rounds, {
            "pipeline": dict(recipe="synthetic", overrides=base + [f"requests={m}"], threads=1, repeat=3),
            "direct": dict(recipe="synthetic", overrides=base + [f"requests={m}"], threads=1, repeat=3, direct=True),
            "alone": dict(recipe="synthetic", overrides=base + [f"requests={singles}"], threads=1, repeat=1, single=True),
        })
        wall, direct = best["pipeline"]["wall_s"], best["direct"]["wall_s"] / (m * p)
        hop = wall / (m * p)
        alone = best["alone"]["latency_s"] / p - direct
        rows.append((str(p), str(m), f"{1000 * wall:.1f}", f"{1e6 * hop:.1f}", f"{1e6 * direct:.1f}",
                     f"{1e6 * (hop - direct):.1f}", f"{1e6 * alone:.1f}"))
    return table(rows)


# ---------------------------------------------------------------- table 3
def matmul_table(ps: list[int], m: int, dim: int, rounds: int) -> list[str]:
    """Sequential and pipelined, with 1 and 2 torch threads, each in a process of its own."""
    rows = [("p", "m", "dim", "how", "torch threads", "wall ms", "speed-up vs 1 thread")]
    for p in ps:
        base = [f"stages={p}", f"requests={m}", "work=matmul", f"dim={dim}", "runtime.microbatch_size=1", "batching.max_delay_ms=0"]
        methods = {f"{how} {t}": dict(recipe="synthetic", overrides=base + (["runtime=sequential"] if how == "sequential" else []),
                                      threads=t, repeat=2)
                   for how in ("sequential", "pipeline") for t in (1, 2)}
        best = best_of(rounds, methods)
        ref = best["sequential 1"]["wall_s"]
        for name, res in best.items():
            how, t = name.split()
            rows.append((str(p), str(m), str(dim), how, t, f"{1000 * res['wall_s']:.1f}", f"{ref / res['wall_s']:.2f}x"))
    return table(rows)


def table(rows: list[tuple[str, ...]]) -> list[str]:
    return common_table(rows).splitlines()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and smaller runs")
    ap.add_argument("--stage-ms", type=float, default=None, help="sleep per stage (default 10, quick 5)")
    ap.add_argument("--only", choices=["sleep", "noop", "matmul"], action="append", help="run only these tables")
    a = ap.parse_args(argv)
    only = set(a.only or ["sleep", "noop", "matmul"])
    stage_ms = a.stage_ms or (5.0 if a.quick else 10.0)
    import torch

    print(f"# mmpipe runtime benchmark ({'quick' if a.quick else 'full'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op threads, python {sys.version.split()[0]})")
    if "sleep" in only:
        print(f"\n## 1. sleep stages of {stage_ms:g} ms each, micro-batch = 1 request")
        print("\n".join(sleep_table([2, 4, 8], [1, 4, 16, 64], stage_ms, 1 if a.quick else 3, 64 if a.quick else 200)))
    if "noop" in only:
        print("\n## 2. runtime overhead per micro-batch per stage hop (no-op stages)")
        print("\n".join(overhead_table([2, 4, 8], 300 if a.quick else 2000, 20 if a.quick else 100, 1 if a.quick else 3)))
    if "matmul" in only:
        print("\n## 3. matmul stages (one dim x dim product per stage per micro-batch) on this machine's cores")
        print("\n".join(matmul_table([2, 4], 16 if a.quick else 32, 384 if a.quick else 512, 1 if a.quick else 3)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
