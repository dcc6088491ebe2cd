"""The image recipes against diffusers on the same weights and seeds.

sd_txt2img vs ``StableDiffusionPipeline`` and ddpm_uncond vs ``DDPMPipeline``:
images within 1e-4 (float32, CPU) for UNet splits of 1, 2 and 3 stages,
micro-batches of 1 and 4 (with continuous batching: items at different
timesteps share a UNet call), guidance on and off, DDIM, Euler and
DPM-Solver++, on the threads runtime and the sequential oracle. Then the CLI
end to end (PNG files, results.jsonl, user errors). Models are the offline
random-weight ones (built once into the mmpipe cache).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from mmpipe.api import compile, open_pipeline, requests_of  # noqa: E402
from mmpipe.graphs.diffusion_models import ensure_model  # noqa: E402
from tests.integration.cli import mmpipe  # noqa: E402

ATOL = 1e-4
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon", "a lighthouse", "x"]
STEPS, SIZE = 3, 32
SCHEDULERS = {"ddim": ("DDIMScheduler", {}), "euler": ("EulerDiscreteScheduler", {}),
              "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"})}


@pytest.fixture(scope="module")
def sd_pipe() -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(ensure_model("tiny_random")), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


_REFS: dict[tuple[str, float], list[Any]] = {}


def reference(pipe: Any, sched: str, guidance: float) -> list[Any]:
    """diffusers' images, one prompt at a time, seed i for prompt i (cached per setting)."""
    import diffusers

    key = (sched, guidance)
    if key not in _REFS:
        base = pipe.scheduler.config
        cls, extra = SCHEDULERS[sched]
        pipe.scheduler = getattr(diffusers, cls).from_config(base, **extra)
        _REFS[key] = [pipe(p, num_inference_steps=STEPS, height=SIZE, width=SIZE, guidance_scale=guidance,
                           generator=torch.Generator().manual_seed(i), output_type="pt").images[0] for i, p in enumerate(PROMPTS)]
        pipe.scheduler = diffusers.DDIMScheduler.from_config(base)
    return _REFS[key]


def run_sd(prompts_file: Path, tmp: Path, *overrides: str) -> list[Any]:
    """Images (tensors) from sd_txt2img through the Python API."""
    plan = compile("sd_txt2img", [f"prompts={prompts_file}", f"num_inference_steps={STEPS}", f"height={SIZE}", f"width={SIZE}",
                                  f"output_dir={tmp}", "+outputs.image=vae.image", *overrides])
    with open_pipeline(plan) as ex:
        res = ex.run(requests_of(plan))
    assert all(r.ok for r in res), [r.error for r in res if not r.ok]
    assert [r.outputs["seed"] for r in res] == list(range(len(res)))
    return [r.outputs["image"] for r in res]


def max_diff(a: list[Any], b: list[Any]) -> float:
    assert len(a) == len(b)
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


# ---------------------------------------------------------------------- sd_txt2img
@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("sched", list(SCHEDULERS))
def test_sd_parity_with_diffusers(sd_pipe: Any, prompts_file: Path, tmp_path: Path, sched: str, guidance: float) -> None:
    """Every split (1-3 stages) x micro-batch (1, 4) on threads, and the sequential oracle."""
    ref = reference(sd_pipe, sched, guidance)
    common = [f"scheduler={sched}", f"guidance_scale={guidance}"]
    diffs = {}
    for split in (1, 2, 3):
        for mb in (1, 4):
            got = run_sd(prompts_file, tmp_path, *common, f"nodes.denoise.split={split}", "runtime=threads",
                         f"runtime.microbatch_size={mb}", "batching.max_batch_size=4")
            diffs[f"threads split={split} mb={mb}"] = max_diff(got, ref)
    got = run_sd(prompts_file, tmp_path, *common, "nodes.denoise.split=3", "nodes.vae.split=2", "runtime=sequential")
    diffs["sequential split=3"] = max_diff(got, ref)
    got = run_sd(prompts_file, tmp_path, *common, "nodes.denoise.channels_last=true", "runtime=threads")
    diffs["threads channels_last"] = max_diff(got, ref)
    print(f"\nmax abs diff vs diffusers, {sched} guidance={guidance}: " + ", ".join(f"{k}: {v:.1e}" for k, v in diffs.items()))
    assert max(diffs.values()) < ATOL, diffs


@pytest.mark.parametrize("sched", ["dpm++", "euler_a"])
def test_batch_of_n_equals_n_singles(sd_pipe: Any, prompts_file: Path, tmp_path: Path, sched: str) -> None:
    """A micro-batch of 4 equals 4 single runs (mmpipe), and diffusers' batched call agrees:
    multistep state (DPM-Solver++) and step noise drawn from each request's own generator
    (Euler ancestral) survive sharing one batched scheduler step."""
    singles = run_sd(prompts_file, tmp_path, "runtime=sequential", f"scheduler={sched}")
    batched = run_sd(prompts_file, tmp_path, "runtime=threads", "runtime.microbatch_size=4", "batching.max_batch_size=4",
                     "batching.max_delay_ms=200", f"scheduler={sched}")
    assert max_diff(batched, singles) < 1e-5
    from mmpipe.graphs.diffusion_load import SDModel, make_scheduler

    base = sd_pipe.scheduler
    sd_pipe.scheduler = make_scheduler(SDModel(path="builtin:tiny_random"), sched)
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    try:
        theirs = sd_pipe(PROMPTS, num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=gens, output_type="pt").images
    finally:
        sd_pipe.scheduler = base
    assert max_diff(list(theirs), singles) < ATOL


def test_large_unet_three_stages(prompts_file: Path, tmp_path: Path) -> None:
    """model=tiny_random_large (3 down blocks, cross-attention mid block) split over 3 stages."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(ensure_model("tiny_random_large")), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    ref = [pipe(PROMPTS[0], num_inference_steps=2, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(0),
                output_type="pt").images[0]]
    one = tmp_path / "one.txt"
    one.write_text(PROMPTS[0])
    got = run_sd(one, tmp_path, "model=tiny_random_large", "num_inference_steps=2", "nodes.denoise.split=3", "runtime=threads")
    assert max_diff(got, ref) < ATOL


def test_taesd_decoder_matches_diffusers(sd_pipe: Any, prompts_file: Path, tmp_path: Path) -> None:
    """nodes.vae.taesd=DIR decodes with AutoencoderTiny exactly as a pipeline using it as its VAE."""
    from diffusers import AutoencoderTiny, StableDiffusionPipeline

    torch.manual_seed(0)
    taesd = AutoencoderTiny(encoder_block_out_channels=(32, 32), decoder_block_out_channels=(32, 32),
                            num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    taesd.save_pretrained(tmp_path / "taesd")
    comps = {**sd_pipe.components, "vae": AutoencoderTiny.from_pretrained(tmp_path / "taesd")}
    pipe = StableDiffusionPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    ref = [pipe(p, num_inference_steps=STEPS, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(i),
                output_type="pt").images[0] for i, p in enumerate(PROMPTS)]
    got = run_sd(prompts_file, tmp_path, f"+nodes.vae.taesd={tmp_path / 'taesd'}", "runtime=threads")
    assert max_diff(got, ref) < ATOL


# ---------------------------------------------------------------------- ddpm_uncond
@pytest.mark.parametrize("sched", ["default", "ddim"])
def test_ddpm_parity_with_diffusers(tmp_path: Path, sched: str) -> None:
    from diffusers import DDIMScheduler, DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(str(ensure_model("tiny_ddpm")))
    pipe.set_progress_bar_config(disable=True)
    if sched == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    ref = [pipe(batch_size=1, num_inference_steps=4, generator=torch.Generator().manual_seed(s), output_type="pt").images[0]
           for s in range(4)]
    diffs = {}
    for split, mb, backend in ((1, 4, "threads"), (2, 1, "threads"), (3, 4, "threads"), (3, 1, "threads"), (2, 1, "sequential")):
        plan = compile("ddpm_uncond", ["images=4", "num_inference_steps=4", f"scheduler={sched}", f"nodes.denoise.split={split}",
                                       f"runtime={backend}", f"runtime.microbatch_size={mb}", "batching.max_batch_size=4",
                                       f"output_dir={tmp_path}", "+outputs.image=denoise.image"])
        with open_pipeline(plan) as ex:
            res = ex.run(requests_of(plan))
        assert all(r.ok for r in res), [r.error for r in res if not r.ok]
        diffs[(split, mb, backend)] = max_diff([r.outputs["image"] for r in res], ref)
        assert sorted(Path(r.outputs["path"]).name for r in res) == [f"{i:04d}.png" for i in range(4)]
    print(f"\nddpm_uncond max abs diff vs DDPMPipeline, {sched}: " + ", ".join(f"{k}: {v:.1e}" for k, v in diffs.items()))
    assert max(diffs.values()) < ATOL, diffs


# ---------------------------------------------------------------------- the CLI
def test_cli_run_writes_pngs_and_results(prompts_file: Path, tmp_path: Path) -> None:
    r = mmpipe("run", "sd_txt2img", f"prompts={prompts_file}", "num_images_per_prompt=2", "num_inference_steps=2",
               "height=32", "width=32", "seed=10", f"output_dir={tmp_path}", "-q")
    assert r.returncode == 0, r.stderr
    assert "NOISE" in r.stderr  # tiny_random says plainly that it makes noise
    lines = [json.loads(ln) for ln in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * len(PROMPTS)
    first = lines[0]["outputs"]
    assert first["prompt"] == PROMPTS[0] and first["seed"] == 10 and first["steps"] == 2
    assert [ln["outputs"]["seed"] for ln in lines] == list(range(10, 10 + 2 * len(PROMPTS)))
    from PIL import Image

    for ln in lines:
        path = Path(ln["outputs"]["path"])
        assert path.parent == tmp_path and path.name == f"{ln['id']}.png"
        assert Image.open(path).size == (32, 32)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "NOISE" in summary["models"]["denoise"]["note"]


def test_cli_png_provenance(tmp_path: Path) -> None:
    """Each PNG carries its generation parameters (tEXt, iTXt for non-Latin-1 text, and
    A1111's ``parameters``), and results.jsonl has guidance, scheduler and size."""
    r = mmpipe("run", "sd_txt2img", "prompt=a cat, oil painting", "negative_prompt=blurry, 猫", "num_inference_steps=2",
               "guidance_scale=5.0", "scheduler=euler", "height=32", "width=48", "seed=7", f"output_dir={tmp_path}", "-q")
    assert r.returncode == 0, r.stderr
    line = json.loads((tmp_path / "results.jsonl").read_text())
    out = line["outputs"]
    assert (out["guidance"], out["scheduler"], out["size"], out["seed"], out["steps"]) == (5.0, "EulerDiscreteScheduler", "48x32", 7, 2)
    from PIL import Image

    text = Image.open(out["path"]).text
    assert {k: text[k] for k in ("prompt", "negative_prompt", "seed", "steps", "guidance", "scheduler", "size", "model")} == {
        "prompt": "a cat, oil painting", "negative_prompt": "blurry, 猫", "seed": "7", "steps": "2", "guidance": "5.0",
        "scheduler": "EulerDiscreteScheduler", "size": "48x32", "model": "tiny_random"}
    assert text["parameters"] == ("a cat, oil painting\nNegative prompt: blurry, 猫\nSteps: 2, Sampler: EulerDiscreteScheduler, "
                                  "CFG scale: 5.0, Seed: 7, Size: 48x32, Model: tiny_random")


def test_cli_ddpm_uncond(tmp_path: Path) -> None:
    r = mmpipe("run", "ddpm_uncond", "images=2", "num_inference_steps=2", "scheduler=ddim", f"output_dir={tmp_path}", "-q")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["0000.png", "0001.png"]
    from PIL import Image

    text = Image.open(tmp_path / "0001.png").text
    assert (text["seed"], text["steps"], text["scheduler"], text["size"], text["model"]) == ("1", "2", "DDIMScheduler", "32x32", "tiny_ddpm")
    assert "guidance" not in text and "CFG scale" not in text["parameters"]


def test_cli_user_errors_exit_2(tmp_path: Path) -> None:
    r = mmpipe("run", "sd_txt2img", "model.path=/no/such/model", "num_inference_steps=1", f"output_dir={tmp_path}", "-q")
    assert r.returncode == 2 and "model.path" in r.stderr and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = mmpipe("validate", "sd_txt2img", "scheduler=eulr", "height=33")
    assert r.returncode == 2 and "unknown scheduler 'eulr'" in r.stderr and "height" in r.stderr
    # Real weights named by hub id: offline, the error says how to get them.
    r = mmpipe("run", "sd_txt2img", "model=sd15", "num_inference_steps=1", f"output_dir={tmp_path}", "-q",
               env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "model.path" in r.stderr and "Traceback" not in r.stderr
