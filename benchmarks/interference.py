"""How much a recipe's parts slow down when the other cores run the same recipe.

    python benchmarks/interference.py                 # whisper_stt, 8 full windows, micro-batches of 2
    python benchmarks/interference.py --rounds 1 -- runtime.microbatch_size=4

``mmpipe profile`` times every part alone, one thread, on an otherwise idle machine;
without ``--co-run`` factors ``mmpipe plan --simulate`` assumes a part runs as fast beside
busy cores as alone. This measures that assumption: the same profile is taken alone and
while every other core runs the same recipe (the co-runners of ``mmpipe profile
--co-run``: one process per core, the sequential executor, one intra-op thread, its
weights loaded once, running the recipe's requests over and over). It also times two
probes the same way, a 64x384 by 384x1536 matmul (compute) and a 64 MB copy (memory
bandwidth), so a slowdown can be told apart from a busy core (each process keeps one core
busy: the profile's own ``cpu_share`` is printed).

Every party is a process of its own; rounds alternate alone / co-run and keep each part's
fastest time. Prints a table; decides nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, long_clips, make_profile, table  # noqa: E402

from mmpipe.corun import co_runners  # noqa: E402
from mmpipe.dsl.costs import load_profile  # noqa: E402

PROBES = """
import json, sys, time, torch
torch.set_num_threads(1)
x, w, w2 = torch.randn(64, 384), torch.randn(384, 1536), torch.randn(1536, 384)
a = torch.randn(16 * 1024 * 1024); b = torch.empty_like(a)
def best(fn, n):
    fn()
    out = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t0) / n)
    return min(out)
print(json.dumps({"matmul 64x384x1536 (compute)": best(lambda: (x @ w) @ w2, 200),
                  "copy 64 MB (memory bandwidth)": best(lambda: b.copy_(a), 20)}))
"""


def env1() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def probes() -> dict[str, float]:
    r = subprocess.run([sys.executable, "-c", PROBES], env=env1(), capture_output=True, text=True, timeout=600, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def part_times(path: Path) -> tuple[dict[str, float], float]:
    """{"node part k": seconds per call} and the profile's cpu_share."""
    prof = load_profile(path)
    out = {f"{name} part {k}": p.time_s for name, nc in prof.nodes.items() if not nc.light for k, p in enumerate(nc.parts)}
    return out, float(prof.host.get("cpu_share", 1.0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="whisper_stt")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="recipe overrides (default: 8 full 27-s windows, micro-batches of 2)")
    a = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        overrides = a.overrides
        if a.recipe == "whisper_stt" and not any(o.startswith("input=") for o in overrides):
            (tmp / "long").mkdir()
            overrides = [f"input={long_clips(8, tmp / 'long')}/*.wav", "max_new_tokens=128", "runtime.microbatch_size=2", *overrides]
        best: dict[str, dict[str, float]] = {"alone": {}, "co-run": {}}
        shares: dict[str, list[float]] = {"alone": [], "co-run": []}
        for r in range(a.rounds):
            for mode in ("alone", "co-run"):
                with co_runners(a.recipe, overrides, cores - 1 if mode == "co-run" else 0, threads=1):
                    times, share = part_times(make_profile(a.recipe, overrides, tmp / f"p_{mode}_{r}", threads=1))
                    times.update(probes())
                shares[mode].append(share)
                for k, v in times.items():
                    best[mode][k] = min(v, best[mode].get(k, v))
                print(f"  round {r + 1}: {mode} (load {os.getloadavg()[0]:.2f})", flush=True)
    rows = [("part", "alone ms", "co-run ms", "co-run / alone")]
    for k, v in best["alone"].items():
        c = best["co-run"].get(k)
        rows.append((k, f"{1000 * v:.3f}", f"{1000 * c:.3f}" if c else "-", f"{c / v:.2f}x" if c else "-"))
    print(f"\n## {a.recipe}: each part alone and with {cores - 1} co-runner(s) of the same recipe on the other core(s)"
          f" (best of {a.rounds} rounds; {' '.join(overrides)})")
    print(f"profile cpu_share: alone {min(shares['alone']):.2f}, co-run {min(shares['co-run']):.2f} (1.0: the profiled thread had a core of its own)")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
