"""Image generation: mmpipe's sd_txt2img vs diffusers' StableDiffusionPipeline, one process per run.

    .venv/bin/python benchmarks/diffusion.py                  # 8 prompts x 20 steps, both models, best of 3
    .venv/bin/python benchmarks/diffusion.py --quick          # 4 prompts x 4 steps, tiny only, 1 round
    .venv/bin/python benchmarks/diffusion.py --models tiny_random --repeat 5 --methods "diffusers batched,mmpipe threads split=2 mb=half"
    .venv/bin/python benchmarks/diffusion.py --variant "nodes.denoise.split=3 runtime.microbatch_size=8"   # + another mmpipe plan

Methods (all on the same weights and seeds, every one writes its PNGs):
diffusers one prompt at a time, diffusers batched (one call, a generator per
prompt), and mmpipe with several runtime settings. Every measurement runs in a
fresh process of its own (this script re-invokes itself with ``--method``): a
reference timed in a process that also hosts mmpipe's worker threads runs
measurably slower (each thread that ran a parallel op keeps an OpenMP pool, and
once a process holds more OpenMP threads than cores libgomp all but stops
spin-waiting between parallel regions), so sharing a process is not a fair
comparison. Each process loads its model, warms up on the first two prompts,
times one run of all prompts and writes its wall time, its own CPU time, the CPU
time other processes used meanwhile, and its images (uint8, ``.npy``) for the
parent. Rounds are interleaved (every method once per round, the order rotated
each round) because other processes may share the cores: after its warm-up,
each process waits (up to ``--wait-quiet`` seconds) until no other process has
been runnable for two seconds before it starts the clock, and the fastest round
per method is kept. With 2 OpenMP threads per
process, a run that shares its cores slows down far more than the load suggests
(barriers wait for descheduled threads): look at the "others" column before
trusting a row. The table gives each time against
diffusers batched measured in the same invocation (>1: faster than it) and the
largest pixel difference from diffusers batched (0-255 levels). It reports, it
never decides pass/fail. The models have random weights: the images are noise.
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
from typing import Any, Callable

PROMPTS = [
    "a photo of a cat", "an astronaut riding a horse on the moon", "a watercolor of a lighthouse at dawn",
    "a bowl of ramen, studio lighting", "a red fox in the snow", "a city skyline at night, long exposure",
    "a macro photo of a dew drop on a leaf", "an oil painting of a sailing ship in a storm",
]
REFERENCE = "diffusers batched"
DIFFUSERS = ("diffusers one at a time", REFERENCE)
# mmpipe settings measured: label -> overrides ({n}: the number of prompts, {h}: half of it).
# An upper-case NAME=VALUE is an environment variable of that run's process instead.
# runtime.threads_per_stage=1 gives every stage worker one intra-op thread (no OpenMP
# team per stage; the cores are shared by pipelining instead).
MMPIPE_RUNS: dict[str, list[str]] = {
    "mmpipe sequential": ["runtime=sequential", "nodes.denoise.split=1"],
    "mmpipe threads split=1 mb=all": ["runtime=threads", "nodes.denoise.split=1", "runtime.microbatch_size={n}"],
    "mmpipe threads split=2 mb=half": ["runtime=threads", "nodes.denoise.split=2", "runtime.microbatch_size={h}"],
    "mmpipe split=2 mb=half chan_last": ["runtime=threads", "nodes.denoise.split=2", "runtime.microbatch_size={h}",
                                         "nodes.denoise.channels_last=true"],
    "mmpipe split=2 mb=half 1 thread/stage": ["runtime=threads", "nodes.denoise.split=2", "runtime.microbatch_size={h}",
                                              "runtime.threads_per_stage=1"],
}
VARIANT = "mmpipe + "  # label prefix of --variant runs (extra overrides on the recipe's defaults)


# ---------------------------------------------------------------------- one measurement (child process)
def build(method: str, model: str, prompts: list[str], steps: int, size: int, device: str, dtype: str,
          out_dir: Path) -> tuple[Callable[[list[str]], list[Any]], Callable[[], None]]:
    """A runner for ``method`` (prompts -> uint8 HxWx3 images, PNGs written) and its closer."""
    import numpy as np
    import torch
    from PIL import Image

    if method in DIFFUSERS:
        from diffusers import StableDiffusionPipeline

        from mmpipe.graphs.diffusion_models import ensure_model

        pipe = StableDiffusionPipeline.from_pretrained(str(ensure_model(model)), safety_checker=None,
                                                       torch_dtype=getattr(torch, dtype)).to(device)
        pipe.set_progress_bar_config(disable=True)
        kw = dict(num_inference_steps=steps, height=size, width=size, output_type="pil")

        def gen(i: int) -> Any:  # prompt i gets seed i, as mmpipe's request i
            return torch.Generator().manual_seed(i)

        def run_diffusers(ps: list[str]) -> list[Any]:
            if method == REFERENCE:
                imgs = pipe(ps, generator=[gen(i) for i in range(len(ps))], **kw).images
            else:
                imgs = [pipe(p, generator=[gen(i)], **kw).images[0] for i, p in enumerate(ps)]
            for i, im in enumerate(imgs):  # mmpipe writes PNGs too: same work on both sides
                im.save(out_dir / f"d{i}.png")
            return [np.asarray(im, dtype=np.uint8) for im in imgs]

        return run_diffusers, lambda: None

    from mmpipe.api import compile, open_pipeline, requests_of

    ovs = [o for o in settings(method, len(prompts)) if not is_env(o)]
    pfile = out_dir / "prompts.txt"
    pfile.write_text("\n".join(prompts))
    plan = compile("sd_txt2img", [f"model={model}", f"prompts={pfile}", f"num_inference_steps={steps}", f"height={size}",
                                  f"width={size}", f"output_dir={out_dir / 'm'}", f"placement.default={device}",
                                  f"runtime.dtype={dtype}", f"batching.max_batch_size={len(prompts)}", *ovs])
    reqs = requests_of(plan)
    ex = open_pipeline(plan)
    ex.start()  # weights load here, outside the timed run

    def run_mmpipe(ps: list[str]) -> list[Any]:
        res = ex.run(reqs[: len(ps)])
        bad = [r.error for r in res if not r.ok]
        if bad:
            raise RuntimeError(f"{method}: {bad[0]}")
        return [np.asarray(Image.open(r.outputs["path"]).convert("RGB"), dtype=np.uint8) for r in res]

    return run_mmpipe, ex.close


def cpu_now() -> tuple[float, float]:
    """(CPU seconds of this process, busy CPU seconds of the whole machine) so far."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    try:  # /proc/stat "cpu": user nice system idle iowait irq softirq steal ... (clock ticks)
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = float("nan")
    return ru.ru_utime + ru.ru_stime, busy


def settings(method: str, n: int) -> list[str]:
    """The overrides and NAME=VALUE environment settings of an mmpipe method."""
    if method.startswith(VARIANT):
        return method[len(VARIANT):].split()
    return [o.format(n=n, h=max(1, n // 2)) for o in MMPIPE_RUNS.get(method, [])]


def is_env(token: str) -> bool:
    name = token.split("=", 1)[0]
    return "=" in token and name.isupper() and name.replace("_", "").isalnum()


def wait_quiet(max_s: float, calm_s: float = 2.0) -> float:
    """Wait until no other process has been runnable for ``calm_s`` (at most ``max_s``); seconds waited."""
    t0 = time.monotonic()
    calm_since = t0
    while time.monotonic() - t0 < max_s:
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])  # includes this process
        except (OSError, ValueError, IndexError):
            return 0.0
        now = time.monotonic()
        if running > 1:
            calm_since = now
        elif now - calm_since >= calm_s:
            break
        time.sleep(0.1)
    return time.monotonic() - t0


def measure(a: argparse.Namespace, prompts: list[str]) -> int:
    """``--method``: warm up, time one run of all prompts, write the times (JSON) and images (.npy)."""
    import numpy as np
    import torch

    out = Path(a.out)
    with tempfile.TemporaryDirectory(prefix="mmpipe-bench-") as tmp:
        run, close = build(a.method, a.model, prompts, a.steps, a.size, a.device, a.dtype, Path(tmp))
        try:
            run(prompts[:2])  # warm-up: first-call allocations, oneDNN primitives, thread pools
            waited = wait_quiet(a.wait_quiet) if a.wait_quiet > 0 else 0.0
            own0, busy0 = cpu_now()
            t0 = time.perf_counter()
            imgs = run(prompts)
            wall = time.perf_counter() - t0
            own1, busy1 = cpu_now()
        finally:
            close()
    np.save(out.with_suffix(".npy"), np.stack(imgs))
    others = max(0.0, (busy1 - busy0) - (own1 - own0))  # CPU time other processes took meanwhile
    out.write_text(json.dumps({"method": a.method, "model": a.model, "s": wall, "cpu_s": own1 - own0,
                               "others_pct": 100 * others / (wall * (os.cpu_count() or 1)), "load": os.getloadavg()[0],
                               "waited_s": waited,
                               "torch_threads": torch.get_num_threads()}))
    return 0


# ---------------------------------------------------------------------- the comparison (parent process)
def child(a: argparse.Namespace, method: str, model: str, out: Path) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its JSON record."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--method", method, "--model", model, "--out", str(out),
           "--prompts", str(a.prompts), "--steps", str(a.steps), "--size", str(a.size), "--device", a.device, "--dtype", a.dtype,
           "--wait-quiet", str(a.wait_quiet)]
    env = dict(os.environ, **dict(o.split("=", 1) for o in settings(method, a.prompts) if is_env(o)))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{method} on {model} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


def bench_model(a: argparse.Namespace, model: str, methods: list[str], work: Path) -> list[dict[str, Any]]:
    """Every method ``a.repeat`` times, interleaved (order rotated per round); the fastest round kept."""
    import numpy as np

    best: dict[str, dict[str, Any]] = {}
    for r in range(a.repeat):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        load0 = os.getloadavg()[0]
        times = []
        for m in order:
            rec = child(a, m, model, work / f"{model}-{methods.index(m)}-{r}.json")
            rec["npy"] = str(work / f"{model}-{methods.index(m)}-{r}.npy")
            times.append(f"{m}: {rec['s']:.2f} s (others {rec['others_pct']:.0f}%)")
            if m not in best or rec["s"] < best[m]["s"]:
                best[m] = rec
        print(f"[{model} round {r + 1}/{a.repeat}] 1-min load {load0:.2f} -> {os.getloadavg()[0]:.2f}; " + ", ".join(times),
              file=sys.stderr, flush=True)
    ref_t = best[REFERENCE]["s"] if REFERENCE in best else None
    ref_img = np.load(best[REFERENCE]["npy"]).astype(np.int16) if REFERENCE in best else None
    rows = []
    for m in methods:
        rec = best[m]
        row: dict[str, Any] = {"model": model, "run": m, "s": round(rec["s"], 4), "cpu_s": round(rec["cpu_s"], 3),
                               "others_pct": round(rec["others_pct"], 1), "load_at_best": round(rec["load"], 2)}
        if ref_t is not None:
            row["x_diffusers_batched"] = round(ref_t / rec["s"], 3)
        if ref_img is not None and m != REFERENCE:
            row["max_pixel_diff"] = int(np.abs(np.load(rec["npy"]).astype(np.int16) - ref_img).max())
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], a: argparse.Namespace) -> str:
    w = max(34, *(len(r["run"]) for r in rows))
    lines = [f"{'model':<18} {'run':<{w}} {'time s':>8} {'img/s':>7} {'x diffusers batched':>20} {'max px diff':>11} "
             f"{'cpu s':>6} {'others':>6} {'load':>5}", "-" * (90 + w)]
    for r in rows:
        ratio = f"{r['x_diffusers_batched']:.2f}x" if "x_diffusers_batched" in r else "-"
        diff = str(r.get("max_pixel_diff", ""))
        lines.append(f"{r['model']:<18} {r['run']:<{w}} {r['s']:>8.3f} {a.prompts / r['s']:>7.2f} {ratio:>20} {diff:>11} "
                     f"{r['cpu_s']:>6.2f} {r['others_pct']:>5.0f}% {r['load_at_best']:>5.2f}")
    lines.append(f"({a.prompts} prompts x {a.steps} steps, {a.size}x{a.size}, guidance 7.5, model's own scheduler; best of "
                 f"{a.repeat} interleaved round(s), each run in its own process; px diff: 0-255 levels vs diffusers batched; "
                 f"cpu s: the run's own CPU time; others: CPU share other processes took during the kept run; "
                 f"load: 1-min load average when it ended, on {os.cpu_count()} cores)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny_random,tiny_random_large")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds, one process per method each; the fastest counts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quick", action="store_true", help="4 prompts x 4 steps on tiny_random, 1 round")
    ap.add_argument("--methods", help="comma-separated subset of the method labels (default: all)")
    ap.add_argument("--variant", action="append", default=[],
                    help="another mmpipe run with these overrides and NAME=VALUE environment settings (repeatable)")
    ap.add_argument("--wait-quiet", type=float, default=30.0,
                    help="before starting its clock, each run waits up to this many seconds until no other process "
                         "has been runnable for 2 s (0: never)")
    ap.add_argument("--json", help="also write the rows as JSON here")
    # one measurement, in this process (what the comparison runs for each method and round)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        a.models, a.prompts, a.steps, a.repeat = "tiny_random", 4, 4, 1
    prompts = (PROMPTS * (a.prompts // len(PROMPTS) + 1))[: a.prompts]
    if a.method:
        return measure(a, prompts)
    methods = [*DIFFUSERS, *MMPIPE_RUNS, *(VARIANT + v for v in a.variant)]
    if a.methods:
        wanted = [m.strip() for m in a.methods.split(",")]
        unknown = [m for m in wanted if m not in methods]
        if unknown:
            ap.error(f"unknown method(s) {unknown}; choose from {methods}")
        methods = [m for m in methods if m in wanted]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mmpipe-bench-") as work:
        for model in a.models.split(","):
            rows += bench_model(a, model, methods, Path(work))
            print(table(rows, a), file=sys.stderr, flush=True)
    print(table(rows, a))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
