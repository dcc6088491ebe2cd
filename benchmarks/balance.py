"""Profile, balance, simulate: predictions against measured runs on this machine.

    python benchmarks/balance.py                    # all tables (about 15-20 minutes on 2 cores)
    python benchmarks/balance.py --quick            # fewer cases and rounds
    python benchmarks/balance.py --only synthetic   # or whisper, placement

1. ``synthetic`` (sleep and matmul stages, p = 2, 4, 8; m micro-batches): the throughput and
   bubble ``mmpipe plan --simulate`` predicts from a profile, against the measured run.
2. ``whisper``: ``nodes.encoder.split=auto nodes.decoder.split=auto`` over 2 and over 3
   stages (``balance.stages``), threads backend: per-stage time predicted (profile, alone),
   simulated (shared cores) and measured (the workers' busy time per micro-batch), the
   balance efficiency and the throughput, on the benchmark's short clips and on full 30-s
   windows of speech.
3. ``placement``: whisper_stt over 2 ranks (distributed, 1 thread per rank) with
   ``placement=auto`` against the hand-written placements of ``benchmarks/distributed.py``.

Every run is a process of its own (``common.method``: warm-up, then the best of its runs),
rounds interleaved; profiles are taken in their own processes just before, for sections 1
and 2 with ``--co-run`` (each part also timed beside the recipe on the other core, which
the simulator charges while both cores are busy). Whisper runs use
one intra-op thread per stage (``OMP_NUM_THREADS=1``; ``runtime.threads_per_rank=1``): on
this shared 2-core machine two threads per stage make the decoder's small ops wait for a
descheduled OpenMP thread, and times swing several-fold with the other processes' load.
The 1-minute load average is printed with every run. Prints tables; decides nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import best_of, clip_set, long_clips, make_profile, table  # noqa: E402

from mmpipe.dsl.compile import compile_loaded  # noqa: E402
from mmpipe.dsl.costs import load_profile  # noqa: E402
from mmpipe.dsl.load import load_recipe  # noqa: E402
from mmpipe.dsl.predict import versus_measured  # noqa: E402
from mmpipe.dsl.simulate import simulate  # noqa: E402


def load() -> float:
    return os.getloadavg()[0]


def pct(a: float | None, b: float | None) -> str:
    """Relative error of prediction ``a`` against measurement ``b``."""
    return f"{100 * (a - b) / b:+.0f}%" if a is not None and b else "-"


def predicted(recipe: str, overrides: list[str], requests: int, threads: int = 0) -> tuple[Any, Any, Any]:
    """(plan, its simulation of ``requests`` requests, profile); ``threads``: OMP_NUM_THREADS of
    the runs (part of a profile's key)."""
    old = os.environ.pop("OMP_NUM_THREADS", None)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        plan = compile_loaded(load_recipe(recipe, overrides), mode="simulate")
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        if old is not None:
            os.environ["OMP_NUM_THREADS"] = old
    prof = load_profile(plan.predicted["profile"])
    return plan, simulate(plan, prof, requests), prof


# ------------------------------------------------------------------ 1. synthetic
def synthetic(quick: bool, tmp: Path) -> None:
    ps, ms, rounds = ((2, 4, 8), (4, 16), 1) if quick else ((2, 4, 8), (4, 16, 48), 2)
    rows = [("work", "p", "m", "measured req/s", "simulated req/s", "error", "measured bubble", "simulated bubble", "load")]
    for work in ("sleep", "matmul"):
        for p in ps:
            base = [f"stages={p}", f"work={work}", "stage_ms=5", "dim=512", "runtime.microbatch_size=1", "batching.max_delay_ms=0"]
            threads = 1 if work == "matmul" else 0
            prof = make_profile("synthetic", base + ["requests=8"], tmp / f"syn_{work}_{p}", threads=threads, co_run=True)
            methods = {f"m={m}": dict(recipe="synthetic", overrides=base + [f"requests={m}", f"profile={prof}"], threads=threads or 2, repeat=3)
                       for m in ms}
            best = best_of(rounds, methods)
            for m in ms:
                res = best[f"m={m}"]
                _, sim, _ = predicted("synthetic", base + [f"requests={m}", f"profile={prof}"], m, threads)
                meas = m / res["wall_s"]
                mb = res["stats"].get("bubble_pct")
                rows.append((work, str(p), str(m), f"{meas:.1f}", f"{sim.throughput_rps:.1f}", pct(sim.throughput_rps, meas),
                             f"{mb:.0f}%" if mb is not None else "-", f"{100 * sim.bubble:.0f}%", f"{load():.2f}"))
    print(f"\n## 1. synthetic: simulated vs measured (micro-batch = 1 request, sleep 5 ms or a 512x512 matmul (1 thread) per stage)")
    print(table(rows))


# ------------------------------------------------------------------ 2. whisper, split: auto
def whisper(quick: bool, tmp: Path) -> None:
    short, long = (8, 4) if quick else (16, 8)
    ds, dl = clip_set(short, _dir(tmp, "short")), long_clips(long, _dir(tmp, "long"))
    # (input, micro-batch size): the benchmark's short clips (the encoder's 30-s window is
    # mostly padding: decoding is light), full windows of speech, and full windows in
    # micro-batches of 2 (decoding, flat in the batch, outweighs the encoder about 2:1)
    sets = {f"short clips ({short} x ~2.5 s)": (ds, 4), f"full windows ({long} x ~27 s)": (dl, 4),
            f"full windows ({long} x ~27 s), micro-batch 2": (dl, 2)}
    rounds = 1 if quick else 2
    for name, (d, mbs) in sets.items():
        base = [f"input={d}/*.wav", "max_new_tokens=128", f"runtime.microbatch_size={mbs}"]
        prof = make_profile("whisper_stt", base, tmp / f"wprof_{d.name}_{mbs}", threads=1, co_run=True)
        n = len(list(d.glob("*.wav")))
        variants = {f"{k} stages": base + [f"profile={prof}", "nodes.encoder.split=auto", "nodes.decoder.split=auto", f"balance.stages={k}"]
                    for k in (2, 3)}
        best = best_of(rounds, {v: dict(recipe="whisper_stt", overrides=o, threads=1, repeat=2) for v, o in variants.items()})
        print(f"\n## 2. whisper_stt, split: auto, {name}: threads backend, 1 thread per stage (profile: {prof})")
        for v, o in variants.items():
            plan, sim, _ = predicted("whisper_stt", o, n, threads=1)
            res = best[v]
            cmp = versus_measured(plan.predicted, {**res["stats"], "throughput_rps": n / res["wall_s"]}, sim.to_dict())
            rows = [("stage", "runs", "predicted ms/mb", "simulated ms/mb", "measured ms/mb", "measured vs simulated")]
            for r in cmp["stages"]:
                st = plan.stages[r["stage"]]
                rows.append((str(r["stage"]), plan.stage_label(st)[:44], f"{1000 * r['predicted_s']:.0f}", f"{1000 * r['simulated_s']:.0f}",
                             f"{1000 * r['measured_s']:.0f}", pct(r["simulated_s"], r["measured_s"]) if r["heavy"] else "(light)"))
            be, tp = cmp["balance_efficiency"], cmp["throughput_rps"]
            print(f"\n{v}: {', '.join(plan.stage_label(s) for s in plan.stages)}")
            print(table(rows))
            print(f"balance efficiency: predicted {be['predicted']:.2f}, simulated {be['simulated']:.2f}, measured {be['measured']:.2f}; "
                  f"throughput: simulated {tp['simulated']:.2f}, measured {tp['measured']:.2f} req/s ({pct(tp['simulated'], tp['measured'])}); "
                  f"bubble simulated {100 * cmp['bubble']['simulated']:.0f}%, measured {100 * cmp['bubble']['measured']:.0f}%; load {load():.2f}")


def _dir(tmp: Path, name: str) -> Path:
    d = tmp / name
    d.mkdir(parents=True, exist_ok=True)
    return d


# ------------------------------------------------------------------ 3. placement: auto over 2 ranks
def placement(quick: bool, tmp: Path) -> None:
    n, rounds = (8, 1) if quick else (16, 3)
    d = clip_set(n, _dir(tmp, "place"))
    base = [f"input={d}/*.wav", "max_new_tokens=128"]
    dist = ["runtime=distributed", "runtime.nproc=2", "runtime.threads_per_rank=1"]
    prof = make_profile("whisper_stt", base + dist, tmp / "pprof")
    auto = base + dist + ["placement=auto", f"profile={prof}"]
    plan, sim, _ = predicted("whisper_stt", auto, n)
    methods = {
        "threads backend (2 torch threads)": dict(recipe="whisper_stt", overrides=base, threads=2, repeat=2),
        "distributed, 2 ranks x 1 thread": dict(recipe="whisper_stt", overrides=base + dist, threads=1, repeat=2, nproc=2),
        "distributed, encoder on both ranks": dict(recipe="whisper_stt", overrides=base + dist + ["placement.encoder=[rank0,rank1]"],
                                                   threads=1, repeat=2, nproc=2),
        "distributed, placement=auto": dict(recipe="whisper_stt", overrides=auto, threads=1, repeat=2, nproc=2),
    }
    best = best_of(rounds, methods)
    hand = max(n / r["wall_s"] for k, r in best.items() if "auto" not in k)
    rows = [("method", "wall s", "req/s", "vs best hand-written")]
    for name, res in best.items():
        rows.append((name, f"{res['wall_s']:.3f}", f"{n / res['wall_s']:.2f}", f"{(n / res['wall_s']) / hand:.2f}x"))
    print(f"\n## 3. whisper_stt over 2 ranks, {n} clips: placement=auto against hand-written placements (best of {rounds} rounds x 2 runs)")
    print("placement=auto chose: " + "; ".join(f"stage {s.index} {plan.stage_label(s)} @ {plan.where(s)}" for s in plan.stages))
    print(f"simulated: {sim.throughput_rps:.2f} req/s")
    print(table(rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["synthetic", "whisper", "placement"], action="append")
    a = ap.parse_args(argv)
    only = set(a.only or ["synthetic", "whisper", "placement"])
    print(f"# mmpipe profile/balance/simulate benchmark ({'quick' if a.quick else 'full'}; {os.cpu_count()} cores, load {load():.2f})")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if "synthetic" in only:
            synthetic(a.quick, tmp)
        if "whisper" in only:
            whisper(a.quick, tmp)
        if "placement" in only:
            placement(a.quick, tmp)
    print(f"\nload average at the end: {load():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
