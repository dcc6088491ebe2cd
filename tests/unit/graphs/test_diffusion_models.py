"""Offline random-weight diffusion models: tokenizer, determinism, loading, cache."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from mmpipe.graphs import diffusion_models as dm
from mmpipe.graphs.diffusion_models import (
    build_tiny_ddpm,
    build_tiny_random_sd,
    ensure_model,
    write_clip_tokenizer,
)

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_random_sd(tmp_path_factory.mktemp("sd") / "tiny_random", seed=0)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip_tokenizer(tmp_path_factory.mktemp("tok") / "clip")


# --------------------------------------------------------------------------- tokenizer


def test_clip_tokenizer_matches_real_clip_ids(tokenizer_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407
    merges = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 48894


def test_clip_tokenizer_truncates_and_pads_to_77(tokenizer_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    ids = tok("word " * 200, truncation=True, max_length=tok.model_max_length).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407
    padded = tok(["a cat", "a photo of a dog"], padding="max_length", truncation=True).input_ids
    assert [len(p) for p in padded] == [77, 77]
    assert padded[0][:5] == [49406, 320, 2368, 49407, 49407]


def test_the_vocabulary_is_vendored() -> None:
    """A plain ``pip install -e .[test]`` has it: the diffusion tests never skip for it."""
    assert dm._clip_bpe_path() == dm._VENDORED_VOCAB
    assert hashlib.sha256(dm._VENDORED_VOCAB.read_bytes()).hexdigest() == (
        "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a")


def test_missing_vocabulary_names_the_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm, "_VENDORED_VOCAB", Path("/nonexistent") / dm._VOCAB_RESOURCE)
    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps open-clip-torch"):
        dm._clip_bpe_path()


# --------------------------------------------------------------------------- builders


def _tensors(model_dir: Path) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.rglob("*.safetensors")):
        rel = f.relative_to(model_dir).as_posix()
        out.update({f"{rel}:{k}": v for k, v in load_file(f).items()})
    return out


def test_weights_are_deterministic_in_seed(tiny_sd: Path, tmp_path: Path) -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    again = build_tiny_random_sd(tmp_path / "again", seed=0)
    assert torch.equal(torch.get_rng_state(), before), "builder must not disturb the caller's RNG"
    a, b = _tensors(tiny_sd), _tensors(again)
    assert a.keys() == b.keys()
    prefixes = {k.split("/")[0] for k in a}
    assert prefixes == {"unet", "vae", "text_encoder"}
    assert all(torch.equal(a[k], b[k]) for k in a)

    other = _tensors(build_tiny_random_sd(tmp_path / "other", seed=1))
    assert any(not torch.equal(a[k], other[k]) for k in a)


def test_build_refuses_existing_destination(tiny_sd: Path) -> None:
    with pytest.raises(FileExistsError):
        build_tiny_ddpm(tiny_sd)
    assert not list(tiny_sd.parent.glob(".tmp-*")), "temporary build dir left behind"


def test_bad_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        build_tiny_random_sd(tmp_path / "x", size="huge")


def test_sd_pipeline_loads_and_generates(tiny_sd: Path) -> None:
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"

    def run(prompt: str | list[str] = "a photo of a cat"):
        g = torch.Generator().manual_seed(0)
        return pipe(prompt, num_inference_steps=2, height=64, width=64, generator=g, output_type="np").images

    img = run()
    assert img.shape == (1, 64, 64, 3)
    assert (img == run()).all(), "same seed, same image"
    assert img.std() > 0

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert run(["a cat", "a dog"]).shape == (2, 64, 64, 3)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert run().shape == (1, 64, 64, 3)


def test_ddpm_pipeline_loads_and_generates(tmp_path: Path) -> None:
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(build_tiny_ddpm(tmp_path / "ddpm"))
    pipe.set_progress_bar_config(disable=True)
    img = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (2, 32, 32, 3)


# --------------------------------------------------------------------------- cache


def test_ensure_model_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ensure_model("tiny_ddpm", cache_dir=tmp_path)
    assert path == tmp_path / "diffusion" / "tiny_ddpm-v1"
    assert (path / "model_index.json").is_file()
    stamp = (path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns

    def no_build(dst: Path) -> Path:
        raise AssertionError("second ensure_model call rebuilt the model")

    monkeypatch.setitem(dm.MODEL_NAMES, "tiny_ddpm", no_build)
    assert ensure_model("tiny_ddpm", cache_dir=tmp_path) == path
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


def test_ensure_model_uses_env_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_sd: Path) -> None:
    monkeypatch.setenv("MMPIPE_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "diffusion" / "tiny_random-v1"
    target.parent.mkdir(parents=True)
    shutil.copytree(tiny_sd, target)  # a complete cached copy must be reused as is
    monkeypatch.setitem(dm.MODEL_NAMES, "tiny_random", lambda d: pytest.fail("rebuilt a cached model"))
    assert ensure_model("tiny_random") == target


def test_ensure_model_loser_of_race_uses_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    winner_src = build_tiny_ddpm(tmp_path / "winner")
    real_build = dm.MODEL_NAMES["tiny_ddpm"]

    def racing_build(dst: Path) -> Path:
        shutil.copytree(winner_src, dst)  # another process renames its build into place first
        return real_build(dst)

    monkeypatch.setitem(dm.MODEL_NAMES, "tiny_ddpm", racing_build)
    cache = tmp_path / "cache"
    path = ensure_model("tiny_ddpm", cache_dir=cache)
    assert path == cache / "diffusion" / "tiny_ddpm-v1"
    assert (path / "model_index.json").is_file()
    assert not list(path.parent.glob(".tmp-*")), "loser's temporary dir left behind"


def test_ensure_model_rejects_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tiny_random"):
        ensure_model("nope", cache_dir=tmp_path)
