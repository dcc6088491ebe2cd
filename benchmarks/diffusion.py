"""Image generation: mmpipe's sd_txt2img vs diffusers' StableDiffusionPipeline, same process.

    .venv/bin/python benchmarks/diffusion.py                  # 8 prompts x 20 steps, both models
    .venv/bin/python benchmarks/diffusion.py --quick          # 4 prompts x 4 steps, tiny only

For each model (the random-weight ``tiny_random`` and ``tiny_random_large``,
UNet block_out_channels (128, 256, 512)) it times, after a short warm-up, round-robin ``--repeat`` times (fastest kept):
diffusers one prompt at a time, diffusers batched (one call, a generator per
prompt), and mmpipe with several runtime settings (all on the same weights and
seeds; every run writes its PNGs). It prints a table with the ratio of the best
diffusers time to each mmpipe time (>1: mmpipe is faster) and the largest
pixel difference between mmpipe's and diffusers' images (parity).
The models have random weights: the images are noise.
"""
from __future__ import annotations

import argparse
import json
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
# mmpipe settings measured: label -> overrides ({n}: the number of prompts).
MMPIPE_RUNS: dict[str, list[str]] = {
    "mmpipe sequential": ["runtime=sequential", "nodes.denoise.split=1"],
    "mmpipe threads split=1 mb=all": ["runtime=threads", "nodes.denoise.split=1", "runtime.microbatch_size={n}"],
    "mmpipe threads split=2 mb=half": ["runtime=threads", "nodes.denoise.split=2", "runtime.microbatch_size={h}"],
    "mmpipe split=2 mb=half chan_last": ["runtime=threads", "nodes.denoise.split=2", "runtime.microbatch_size={h}",
                                         "nodes.denoise.channels_last=true"],
}


def bench_model(model: str, prompts: list[str], steps: int, size: int, repeat: int, device: str, dtype: str) -> list[dict[str, Any]]:
    """Time every setting ``repeat`` times, round-robin (so machine load hits all alike); keep the fastest."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from mmpipe.api import compile, open_pipeline, requests_of
    from mmpipe.graphs.diffusion_models import ensure_model

    pipe = StableDiffusionPipeline.from_pretrained(str(ensure_model(model)), safety_checker=None,
                                                   torch_dtype=getattr(torch, dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)
    out_dir = Path(tempfile.mkdtemp(prefix="mmpipe-bench-"))
    kw = dict(num_inference_steps=steps, height=size, width=size, output_type="pil")

    def gens(seeds: range) -> list[Any]:
        return [torch.Generator().manual_seed(s) for s in seeds]

    def save(imgs: list[Any]) -> list[Any]:  # mmpipe writes PNGs too: same work on both sides
        for i, im in enumerate(imgs):
            im.save(out_dir / f"d{i}.png")
        return [np.array(im, dtype=np.float32) for im in imgs]

    runners: dict[str, Callable[[], list[Any]]] = {
        "diffusers one at a time": lambda: save([pipe(p, generator=gens(range(i, i + 1)), **kw).images[0] for i, p in enumerate(prompts)]),
        "diffusers batched": lambda: save(pipe(prompts, generator=gens(range(len(prompts))), **kw).images),
    }
    pipe(prompts[:2], generator=gens(range(2)), **{**kw, "num_inference_steps": 2})  # warm-up (first-call costs)
    pfile = out_dir / "prompts.txt"
    pfile.write_text("\n".join(prompts))
    executors = []
    for label, ovs in MMPIPE_RUNS.items():
        plan = compile("sd_txt2img", [f"model={model}", f"prompts={pfile}", f"num_inference_steps={steps}", f"height={size}",
                                      f"width={size}", f"output_dir={out_dir / 'm'}", f"placement.default={device}",
                                      f"runtime.dtype={dtype}", f"batching.max_batch_size={len(prompts)}",
                                      *(o.format(n=len(prompts), h=max(1, len(prompts) // 2)) for o in ovs)])
        reqs = requests_of(plan)
        ex = open_pipeline(plan)
        executors.append(ex)
        ex.run(reqs[:2])  # warm-up

        def run(ex: Any = ex, reqs: list[Any] = reqs, label: str = label) -> list[Any]:
            res = ex.run(reqs)
            bad = [r.error for r in res if not r.ok]
            if bad:
                raise RuntimeError(f"{label}: {bad[0]}")
            return [np.array(Image.open(r.outputs["path"]), dtype=np.float32) for r in res]

        runners[label] = run
    times = {k: float("inf") for k in runners}
    images: dict[str, list[Any]] = {}
    try:
        for _ in range(repeat):
            for label, fn in runners.items():
                t0 = time.perf_counter()
                images[label] = fn()
                times[label] = min(times[label], time.perf_counter() - t0)
    finally:
        for ex in executors:
            ex.close()
    ref = images["diffusers batched"]
    best = min(t for k, t in times.items() if k.startswith("diffusers"))
    rows = []
    for label, t in times.items():
        row: dict[str, Any] = {"model": model, "run": label, "s": t, "vs_best_diffusers": round(best / t, 3)}
        if label.startswith("mmpipe"):
            row["max_pixel_diff"] = int(max(np.abs(a - b).max() for a, b in zip(images[label], ref)))
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], steps: int, n: int) -> str:
    lines = [f"{'model':<18} {'run':<34} {'time s':>8} {'img/s':>7} {'x best diffusers':>17} {'max px diff':>11}",
             "-" * 100]
    for r in rows:
        diff = "" if "max_pixel_diff" not in r else str(r["max_pixel_diff"])
        lines.append(f"{r['model']:<18} {r['run']:<34} {r['s']:>8.3f} {n / r['s']:>7.2f} {r['vs_best_diffusers']:>16.2f}x {diff:>11}")
    lines.append(f"({n} prompts x {steps} steps, guidance 7.5, model's own scheduler; px diff: 0-255 levels vs diffusers)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny_random,tiny_random_large")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="runs per setting, round-robin; the fastest counts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quick", action="store_true", help="4 prompts x 4 steps on tiny_random")
    ap.add_argument("--json", help="also write the rows as JSON here")
    a = ap.parse_args(argv)
    if a.quick:
        a.models, a.prompts, a.steps, a.repeat = "tiny_random", 4, 4, 1
    prompts = (PROMPTS * (a.prompts // len(PROMPTS) + 1))[: a.prompts]
    rows: list[dict[str, Any]] = []
    for model in a.models.split(","):
        rows += bench_model(model, prompts, a.steps, a.size, a.repeat, a.device, a.dtype)
        print(table(rows, a.steps, len(prompts)), file=sys.stderr, flush=True)
    print(table(rows, a.steps, len(prompts)))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
