"""The comparisons ``benchmarks/gpu.sh`` makes on a GPU machine, after its ``mmpipe run``s.

    python benchmarks/gpu_check.py whisper RUNS CLIPS   # texts: cpu / cuda / split / fp16 / distributed, and transformers on cuda
    python benchmarks/gpu_check.py sd RUNS              # pixels against diffusers on cuda (same weights, seeds), and its time
    python benchmarks/gpu_check.py summary RUNS         # wall time and throughput of every run

RUNS holds one output_dir per run (results.jsonl, summary.json). Prints tables; decides nothing.
MMPIPE_GPU_DEVICE=cpu runs the references on the CPU (a dry run of gpu.sh without a GPU).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


DEV = os.environ.get("MMPIPE_GPU_DEVICE", "cuda")


def sync() -> None:
    import torch

    if DEV.startswith("cuda"):
        torch.cuda.synchronize()


def rows(run: Path) -> dict[str, Any]:
    return {r["id"]: r for r in (json.loads(x) for x in (run / "results.jsonl").read_text().splitlines())}


def summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def whisper(runs: Path, clips: Path) -> None:
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast

    from mmpipe.graphs.audio import read_audio

    ref = {k: r["outputs"]["text"] for k, r in rows(runs / "w_cpu").items()}
    for name in ("w_cuda", "w_cuda_split", "w_cuda_join", "w_cuda_fp16", "w_dist"):
        if not (runs / name / "results.jsonl").exists():
            print(f"{name}: no results")
            continue
        got = {k: r.get("outputs", {}).get("text") for k, r in rows(runs / name).items()}
        same = sum(got.get(k) == v for k, v in ref.items())
        print(f"{name}: {same}/{len(ref)} transcripts equal to the CPU run; wall {summary(runs / name)['wall_s']:.3f} s")
    root = summary(runs / "w_cuda")["models"]["encoder"]["resolved_path"]
    model = WhisperForConditionalGeneration.from_pretrained(root).eval().to(DEV)
    fe, tok = WhisperFeatureExtractor.from_pretrained(root), WhisperTokenizerFast.from_pretrained(root)
    files = sorted(clips.glob("clip*.wav"))
    waves = [read_audio(str(f), 16000).numpy() for f in files]
    feats = fe(waves, sampling_rate=16000, return_tensors="pt").input_features.to(DEV)

    def timed(num_beams: int, run: str) -> tuple[float, int]:
        """generate on every clip at once: seconds, and how many texts equal mmpipe's ``run``."""
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            ids = model.generate(feats, num_beams=num_beams, max_new_tokens=128)
            sync()
            dt = time.perf_counter() - t0
        mine = rows(runs / run)
        texts = tok.batch_decode(ids, skip_special_tokens=True)
        return dt, sum(mine.get(f.stem, {}).get("outputs", {}).get("text", "").strip() == t.strip() for f, t in zip(files, texts))

    with torch.inference_mode():
        model.generate(feats[:1], num_beams=1, max_new_tokens=8)  # warm up
    dt, same = timed(1, "w_cuda")
    print(f"transformers generate (cuda, batch {len(files)}, greedy): {same}/{len(files)} transcripts equal to mmpipe cuda; {dt:.3f} s")
    if (runs / "w_cuda_beam5" / "results.jsonl").exists():
        dt, same = timed(5, "w_cuda_beam5")
        wall = summary(runs / "w_cuda_beam5")["wall_s"]
        print(f"transformers generate (cuda, batch {len(files)}, num_beams=5): {same}/{len(files)} transcripts equal to mmpipe cuda beam 5; "
              f"{dt:.3f} s vs mmpipe {wall:.3f} s -> {dt / wall:.2f}x")


def sd(runs: Path) -> None:
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    s = summary(runs / "s_cuda")
    path = next(m.get("resolved_path") or m["path"] for m in s["models"].values())
    if path.startswith("builtin:"):
        from mmpipe.graphs.diffusion_models import ensure_model

        path = str(ensure_model(path.split(":", 1)[1]))
    root = path
    pipe = StableDiffusionPipeline.from_pretrained(root, safety_checker=None).to(DEV)
    pipe.set_progress_bar_config(disable=True)
    mine = rows(runs / "s_cuda")
    n, steps = len(mine), s["config"]["num_inference_steps"]
    prompt = s["config"]["prompt"]
    kw = dict(num_inference_steps=steps, height=s["config"]["height"], width=s["config"]["width"], guidance_scale=s["config"]["guidance_scale"])
    worst = 0.0
    for i, (rid, r) in enumerate(sorted(mine.items())):
        img = pipe(prompt, generator=torch.Generator().manual_seed(r["outputs"]["seed"]), output_type="np", **kw).images[0]
        ours = np.asarray(Image.open(r["outputs"]["path"])).astype(np.float32) / 255
        worst = max(worst, float(np.abs(ours - img).max()))
    print(f"sd: {n} images against diffusers one at a time on cuda: max |diff| {worst:.4f} (PNG rounding: 1/255 = 0.0039)")
    gens = [torch.Generator().manual_seed(k) for k in range(n)]
    pipe([prompt] * n, generator=gens, **kw)  # warm up
    sync()
    t0 = time.perf_counter()
    pipe([prompt] * n, generator=gens, **kw)
    sync()
    dt = time.perf_counter() - t0
    print(f"diffusers batched ({n} prompts x {steps} steps, cuda fp32): {dt:.3f} s; mmpipe cuda fp32: {s['wall_s']:.3f} s -> {dt / s['wall_s']:.2f}x")


def table(runs: Path) -> None:
    print(f"{'run':<16} {'requests':>8} {'failed':>6} {'wall s':>8} {'req/s':>8}  stages (busy %)")
    for d in sorted(p for p in runs.iterdir() if (p / "summary.json").exists()):
        s = summary(d)
        busy = ", ".join(f"{st['stage']}{'.' + str(st['replica']) if st.get('replica') else ''}@{st.get('device')}:{st['busy_pct']:.0f}"
                         for st in s.get("stages", []))
        print(f"{d.name:<16} {s['requests']:>8} {s['failed']:>6} {s['wall_s']:>8.3f} {s['throughput_rps'] or 0:>8.2f}  {busy}")


if __name__ == "__main__":
    what, runs = sys.argv[1], Path(sys.argv[2])
    if what == "whisper":
        whisper(runs, Path(sys.argv[3]))
    elif what == "sd":
        sd(runs)
    else:
        table(runs)
