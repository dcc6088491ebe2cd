"""Offline, seeded, random-weight diffusion models for tests and the default recipes.

Nothing here touches the network. The CLIP tokenizer is rebuilt from the real CLIP
BPE vocabulary, vendored in ``assets/clip/`` (OpenAI's, MIT; see its LICENSE) so that a
plain ``pip install`` has it; an ``open-clip-torch`` install is the fallback
(``open_clip`` itself is never imported, since it needs torchvision). The models are random-weight Stable Diffusion 1.x /
DDPM pipelines in the layout diffusers' own fast tests use, saved with
``save_pretrained`` so that they load back through the real diffusers code, into the
shared model store (``model_store``: cache directory, atomic directory writes).

Public API::

    write_clip_tokenizer(dst) -> Path
    build_tiny_random_sd(dst, seed=0, *, size="tiny") -> Path
    build_tiny_ddpm(dst, seed=0) -> Path
    ensure_model(name, cache_dir=None) -> Path      # names: MODEL_NAMES

Note: the tiny VAE has two blocks, so its latent scale factor is 2, not 8 as in
real SD 1.x (a 64x64 image has 32x32 latents). Read it from the pipeline
(``pipe.vae_scale_factor``) rather than assuming 8.

torch, diffusers and transformers are imported inside the functions so that
importing this module stays cheap.
"""

from __future__ import annotations

import errno
import gzip
import importlib.util
import json
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

from mmpipe.graphs.model_store import build_dir, default_cache_dir, quiet_hf

__all__ = [
    "CLIP_VOCAB_SIZE",
    "CLIP_MAX_LENGTH",
    "MODEL_NAMES",
    "OPEN_CLIP_PIP",
    "build_tiny_ddpm",
    "build_tiny_random_sd",
    "default_cache_dir",
    "ensure_model",
    "write_clip_tokenizer",
]

#: The pip line that provides the CLIP BPE vocabulary (without pulling torchvision/timm).
OPEN_CLIP_PIP = "pip install --no-deps open-clip-torch"

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
_N_MERGES = 49152 - 256 - 2  # 48894, as in CLIP's SimpleTokenizer
_VOCAB_RESOURCE = "bpe_simple_vocab_16e6.txt.gz"
_VENDORED_VOCAB = Path(__file__).resolve().parent / "assets" / "clip" / _VOCAB_RESOURCE

#: Bump when a builder changes what it writes, so stale caches are not reused.
_CACHE_VERSION = "v1"
_BUILD_INFO = "mmpipe_build.json"


# ---------------------------------------------------------------------------
# CLIP tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode symbol table (256 entries, fixed order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _clip_bpe_path() -> Path:
    """The vendored CLIP BPE vocabulary, else open_clip's (without importing open_clip)."""
    if _VENDORED_VOCAB.is_file():
        return _VENDORED_VOCAB
    spec = None
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / _VOCAB_RESOURCE
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(
        f"The CLIP BPE vocabulary ({_VOCAB_RESOURCE}) was not found{where}. It ships inside "
        f"the open-clip-torch wheel; install it with: {OPEN_CLIP_PIP}"
    )


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    with gzip.open(_clip_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : _N_MERGES + 1]  # line 0 is a '#version' header
    if len(merges) != _N_MERGES:
        raise ValueError(f"{_VOCAB_RESOURCE}: expected {_N_MERGES} merges, found {len(merges)}")
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [_BOS, _EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"CLIP vocabulary has {len(vocab)} distinct tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges


def write_clip_tokenizer(dst: Path) -> Path:
    """Write the real CLIP (ViT-L/14, SD 1.x) tokenizer into ``dst``; return ``dst``.

    The directory holds ``vocab.json``, ``merges.txt`` and the files written by
    ``CLIPTokenizer.save_pretrained`` (model_max_length 77, pad = ``<|endoftext|>``);
    load it with ``transformers.CLIPTokenizer.from_pretrained(dst)``.
    """
    from transformers import CLIPTokenizer

    dst = Path(dst)
    vocab, merges = _clip_vocab_and_merges()
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(m.split()) for m in merges],
        unk_token=_EOS,
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=_EOS,
        model_max_length=CLIP_MAX_LENGTH,
    )
    tok.save_pretrained(dst)
    return dst


# ---------------------------------------------------------------------------
# Atomic directory writes


# Builders seed torch's global RNG; serialize them within a process so that concurrent
# threads cannot interleave draws (which would make the weights depend on timing).
_BUILD_LOCK = threading.Lock()


def _atomic_build(dst: Path, fill: Callable[[Path], None], info: dict[str, Any]) -> Path:
    """Build ``dst`` atomically in the model store (``fill`` runs in a temporary sibling).

    Raises FileExistsError (after removing the temporary directory) when ``dst``
    already exists and is not empty, e.g. when a concurrent builder won the race.
    """
    dst = Path(dst)

    def build(tmp: Path) -> None:
        with _BUILD_LOCK, quiet_hf():
            fill(tmp)
        (tmp / _BUILD_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    if not build_dir(dst, build, what=f"offline model {dst.name} (random weights, seeded)"):
        raise FileExistsError(errno.EEXIST, "destination already exists", str(dst))
    return dst


def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


# ---------------------------------------------------------------------------
# Builders

_SD_SIZES = {
    "tiny": {
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    },
    "large": {
        "block_out_channels": (128, 256, 512),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    },
}


def _fill_sd(tmp: Path, seed: int, arch: dict[str, Any]) -> None:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=arch["block_out_channels"],
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=arch["down_block_types"],
        up_block_types=arch["up_block_types"],
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=64,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=CLIP_VOCAB_SIZE,
            max_position_embeddings=CLIP_MAX_LENGTH,
        )
    ).eval()
    tok_dir = tmp / ".tokenizer-src"
    write_clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,  # what SD 1.x ships; StableDiffusionPipeline warns and rewrites otherwise
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(tok_dir)


def build_tiny_random_sd(dst: Path, seed: int = 0, *, size: str = "tiny") -> Path:
    """Save a random-weight Stable Diffusion 1.x-layout pipeline directory at ``dst``.

    ``size="tiny"``: UNet (32, 64), as in diffusers' fast tests. ``size="large"``:
    UNet (128, 256, 512) with three down/up blocks, for benchmarks where UNet compute
    dominates. Both use the tiny 2-block VAE (latent scale factor 2), a 5-layer,
    32-wide CLIP text encoder with the real CLIP tokenizer, and DDIM. Weights are
    deterministic in ``seed``. The directory appears atomically; FileExistsError if
    ``dst`` already exists and is not empty.
    """
    if size not in _SD_SIZES:
        raise ValueError(f"size must be one of {sorted(_SD_SIZES)}, got {size!r}")
    arch = _SD_SIZES[size]

    def fill(tmp: Path) -> None:
        import torch

        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state untouched
            _fill_sd(tmp, seed, arch)

    info = {"kind": "stable_diffusion", "size": size, "seed": seed, **_versions()}
    return _atomic_build(Path(dst), fill, info)


def build_tiny_ddpm(dst: Path, seed: int = 0) -> Path:
    """Save a random-weight unconditional DDPM pipeline (UNet2DModel, 3x32x32) at ``dst``."""

    def fill(tmp: Path) -> None:
        import torch
        from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state untouched
            torch.manual_seed(seed)
            unet = UNet2DModel(
                sample_size=32,
                in_channels=3,
                out_channels=3,
                block_out_channels=(32, 64),
                layers_per_block=2,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            )
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp, safe_serialization=True)

    info = {"kind": "ddpm", "seed": seed, **_versions()}
    return _atomic_build(Path(dst), fill, info)


# ---------------------------------------------------------------------------
# Cache

MODEL_NAMES: dict[str, Callable[[Path], Path]] = {
    "tiny_random": lambda d: build_tiny_random_sd(d, seed=0, size="tiny"),
    "tiny_random_large": lambda d: build_tiny_random_sd(d, seed=0, size="large"),
    "tiny_ddpm": lambda d: build_tiny_ddpm(d, seed=0),
}


def _is_complete(path: Path) -> bool:
    return (path / "model_index.json").is_file() and (path / _BUILD_INFO).is_file()


def ensure_model(name: str, cache_dir: Path | None = None) -> Path:
    """Return the directory of the named offline model, building it on first use.

    The model lives at ``<cache_dir>/diffusion/<name>-v1`` where ``cache_dir``
    defaults to :func:`default_cache_dir`. Safe against concurrent builders: each
    builds into its own temporary directory and renames it into place; a loser of
    the race discards its copy and returns the winner's.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown offline diffusion model {name!r}; known: {', '.join(sorted(MODEL_NAMES))}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / "diffusion" / f"{name}-{_CACHE_VERSION}"
    if _is_complete(path):
        return path
    try:
        MODEL_NAMES[name](path)
    except FileExistsError:
        if not _is_complete(path):
            raise FileExistsError(
                errno.EEXIST,
                f"{path} exists but is not a complete {name!r} model; delete it and retry",
                str(path),
            ) from None
    return path
