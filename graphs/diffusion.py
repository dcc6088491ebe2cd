"""Diffusion node kinds: the denoising loop (UNet split by block) and VAE decode."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmpipe.graphs import register
from mmpipe.graphs.base import Batch, ItemMeta, LoopKind, NodeKind, Port
from mmpipe.graphs.text import SDModel

SCHEDULERS = ("ddim", "euler", "dpm++", "ddpm", "pndm", "default")


@dataclass(kw_only=True)
class DenoiseConfig:
    model: SDModel = field(default_factory=SDModel)
    scheduler: str = "default"
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    height: int = 64
    width: int = 64


def _latent_shape(cfg: Any) -> tuple[int | str, ...]:
    m = cfg.model
    return ("B", m.latent_channels, cfg.height // m.vae_scale, cfg.width // m.vae_scale)


@register
class Denoise(LoopKind):
    """A loop over the scheduler's timesteps; UNet parts: down blocks, mid, up blocks."""

    kind = "diffusion.denoise"
    description = "Text embeddings -> denoised latents."
    Config = DenoiseConfig
    splittable = True

    @classmethod
    def ports(cls, cfg: Any) -> tuple[tuple[Port, ...], tuple[Port, ...]]:
        m = cfg.model
        n, d = m.max_length, m.text_hidden
        return (
            (Port("embeds", "float32", ("B", n, d)), Port("uncond_embeds", "float32", ("B", n, d))),
            (Port("latents", "float32", _latent_shape(cfg)),),
        )

    @classmethod
    def num_parts(cls, cfg: Any) -> int:
        return cfg.model.unet_down_blocks + 1 + cfg.model.unet_up_blocks

    @classmethod
    def check(cls, cfg: Any) -> list[tuple[str, str, str]]:
        out = []
        if cfg.scheduler not in SCHEDULERS:
            out.append(("scheduler", f"unknown scheduler {cfg.scheduler!r}", f"use one of {', '.join(SCHEDULERS)}"))
        if cfg.num_inference_steps <= 0:
            out.append(("num_inference_steps", f"must be positive, got {cfg.num_inference_steps}", "e.g. 20"))
        f = cfg.model.vae_scale
        for key in ("height", "width"):
            v = getattr(cfg, key)
            if v <= 0 or v % f:
                out.append((key, f"must be a positive multiple of {f}, got {v}", f"e.g. {key}={max(f, v - v % f)}"))
        return out


@dataclass(kw_only=True)
class VaeConfig:
    model: SDModel = field(default_factory=SDModel)
    height: int = 64
    width: int = 64


@register
class VaeDecode(NodeKind):
    """The VAE decoder; splittable (mid block, then each up block)."""

    kind = "diffusion.vae_decode"
    description = "Latents -> images in [0, 1]."
    Config = VaeConfig
    splittable = True

    @classmethod
    def ports(cls, cfg: Any) -> tuple[tuple[Port, ...], tuple[Port, ...]]:
        return (
            (Port("latents", "float32", _latent_shape(cfg)),),
            (Port("image", "float32", ("B", 3, cfg.height, cfg.width)),),
        )

    @classmethod
    def num_parts(cls, cfg: Any) -> int:
        return 1 + cfg.model.vae_up_blocks

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        raise NotImplementedError("diffusion.vae_decode runs with the image recipe issue")
