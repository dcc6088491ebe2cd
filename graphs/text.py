"""Text node kinds for diffusion: CLIP ``text.tokenize`` and ``text.encode``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmpipe.graphs import register
from mmpipe.graphs.base import Batch, ItemMeta, NodeKind, Port, Request, SourceKind


@dataclass(kw_only=True)
class SDModel:
    """Which Stable Diffusion-family weights to load, and their sizes."""

    name: str = "tiny_random"
    # A local diffusers directory, a hub id, or ``builtin:NAME`` (built offline).
    path: str = "builtin:tiny_random"
    text_hidden: int = 32
    max_length: int = 77
    latent_channels: int = 4
    vae_scale: int = 8
    unet_down_blocks: int = 2
    unet_up_blocks: int = 2
    vae_up_blocks: int = 2
    dtype: str = "float32"


@dataclass(kw_only=True)
class TokenizeConfig:
    model: SDModel = field(default_factory=SDModel)


@register
class Tokenize(NodeKind):
    """CLIP tokenizer: prompt and negative prompt -> padded ids (77, truncated with a warning)."""

    kind = "text.tokenize"
    description = "Prompts -> CLIP token ids."
    Config = TokenizeConfig
    inputs = (Port("prompt", "str", None, collate="list"), Port("negative_prompt", "str", None, collate="list", optional=True))
    light = True

    @classmethod
    def ports(cls, cfg: Any) -> tuple[tuple[Port, ...], tuple[Port, ...]]:
        n = cfg.model.max_length
        return cls.inputs, (Port("ids", "int64", ("B", n)), Port("uncond_ids", "int64", ("B", n)))

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        raise NotImplementedError("text.tokenize runs with the image recipe issue")


@dataclass(kw_only=True)
class EncodeConfig:
    model: SDModel = field(default_factory=SDModel)


@register
class Encode(NodeKind):
    """CLIP text encoder (conditional and unconditional embeddings)."""

    kind = "text.encode"
    description = "CLIP token ids -> text embeddings."
    Config = EncodeConfig

    @classmethod
    def ports(cls, cfg: Any) -> tuple[tuple[Port, ...], tuple[Port, ...]]:
        m = cfg.model
        n, d = m.max_length, m.text_hidden
        return (
            (Port("ids", "int64", ("B", n)), Port("uncond_ids", "int64", ("B", n))),
            (Port("embeds", "float32", ("B", n, d)), Port("uncond_embeds", "float32", ("B", n, d))),
        )

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        raise NotImplementedError("text.encode runs with the image recipe issue")


@dataclass(kw_only=True)
class PromptsConfig:
    prompt: str | None = None
    file: str | None = None
    negative_prompt: str = ""
    num_images_per_prompt: int = 1
    seed: int = 0


@register
class Prompts(SourceKind):
    """``prompt="..."`` or ``prompts=file.txt`` (one per line), each repeated
    ``num_images_per_prompt`` times with seeds ``seed``, ``seed+1``, ..."""

    kind = "text.prompts"
    description = "Text prompts from the command line or a file."
    Config = PromptsConfig
    fields = ("prompt", "negative_prompt")

    @classmethod
    def _prompts(cls, cfg: Any) -> list[str]:
        if cfg.file:
            from pathlib import Path

            return [ln.strip() for ln in Path(cfg.file).read_text().splitlines() if ln.strip()]
        return [cfg.prompt] if cfg.prompt else []

    @classmethod
    def check(cls, cfg: Any) -> list[tuple[str, str, str]]:
        from pathlib import Path

        out = []
        if cfg.file and not Path(cfg.file).is_file():
            out.append(("file", f"prompts file '{cfg.file}' does not exist", "give a text file with one prompt per line"))
        elif not cfg.file and not cfg.prompt:
            out.append(("prompt", "no prompt given", 'pass prompt="..." or prompts=file.txt'))
        if cfg.num_images_per_prompt <= 0:
            out.append(("num_images_per_prompt", f"must be positive, got {cfg.num_images_per_prompt}", "e.g. num_images_per_prompt=2"))
        return out

    @classmethod
    def requests(cls, cfg: Any) -> list[Request]:
        out = []
        for i, prompt in enumerate(cls._prompts(cfg)):
            for k in range(cfg.num_images_per_prompt):
                n = len(out)
                seed = cfg.seed + n
                out.append(Request(id=f"{n:04d}", values={"prompt": prompt, "negative_prompt": cfg.negative_prompt},
                                   input={"prompt": prompt, "negative_prompt": cfg.negative_prompt, "index": i, "image": k},
                                   params={"seed": seed}))
        return out
