"""Image node kinds: ``image.save`` (-> ``<output_dir>/<request id>.png``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmpipe.graphs import register
from mmpipe.graphs.base import Batch, ItemMeta, NodeKind, Port

FORMATS = ("png", "jpg", "webp")


@dataclass(kw_only=True)
class SaveConfig:
    format: str = "png"  # file format PIL writes (png, jpeg, webp)


@register
class Save(NodeKind):
    """Write each image (float, [0, 1], CHW) as ``<output_dir>/<request id>.<format>``."""

    kind = "image.save"
    description = "Images -> PNG files."
    Config = SaveConfig
    inputs = (Port("image", "float32", ("B", "C", "H", "W")),
              Port("info", "any", None, collate="list", optional=True, doc="generation parameters (a denoise node's info) for the PNG"),
              Port("prompt", "str", None, collate="list", optional=True, doc="the prompt, for the PNG"),
              Port("negative_prompt", "str", None, collate="list", optional=True, doc="the negative prompt, for the PNG"))
    outputs = (Port("path", "str", None, collate="list"),)
    light = True

    @classmethod
    def check(cls, cfg: Any) -> list[tuple[str, str, str]]:
        if cfg.format not in FORMATS:
            return [("format", f"unknown image format {cfg.format!r}", f"use one of {', '.join(FORMATS)}")]
        return []

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        out_dir = Path(getattr(self, "output_dir", None) or ".")
        out_dir.mkdir(parents=True, exist_ok=True)
        # NaN would be written as a black picture that looks like a result: fail the request.
        bad = [m.request_id for img, m in zip(x["image"], meta) if not bool(img.isfinite().all())]
        if bad:
            raise ValueError(f"request(s) {', '.join(bad)}: the image holds NaN or infinite values (float16 overflow? "
                             "try runtime.dtype=float32 or bfloat16, or a smaller guidance_scale)")
        paths = []
        n = len(meta)
        infos, prompts, negs = (x.get(k) or [None] * n for k in ("info", "prompt", "negative_prompt"))
        for img, m, info, prompt, neg in zip(to_uint8(x["image"]), meta, infos, prompts, negs):
            name = m.request_id if m.of == 1 else f"{m.request_id}-{m.sub}"
            path = out_dir / f"{name}.{self.cfg.format}"
            params = {"prompt": prompt, "negative_prompt": neg, **(info or {})}
            if self.cfg.format == "png" and (info or prompt):
                to_pil(img).save(path, pnginfo=png_text(params))
            else:
                to_pil(img).save(path)
            paths.append(str(path))
        return {"path": paths}


def parameters_line(p: dict[str, Any]) -> str:
    """The AUTOMATIC1111 ``parameters`` text (read by most SD tools and image viewers)."""
    lines = [str(p.get("prompt") or "")]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    fields = [("Steps", "steps"), ("Sampler", "scheduler"), ("CFG scale", "guidance"), ("Seed", "seed"), ("Size", "size"), ("Model", "model")]
    lines.append(", ".join(f"{label}: {p[k]}" for label, k in fields if p.get(k) is not None))
    return "\n".join(lines)


def png_text(params: dict[str, Any]) -> Any:
    """PNG tEXt chunks: one per parameter, plus A1111's ``parameters``. Chunks with
    non-Latin-1 text (a prompt in another script) are written as iTXt (UTF-8)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in {**{k: v for k, v in params.items() if v is not None}, "parameters": parameters_line(params)}.items():
        text = str(v)
        try:
            text.encode("latin-1")
            info.add_text(k, text)
        except UnicodeEncodeError:
            info.add_itxt(k, text)
    return info


def to_uint8(images: Any) -> Any:
    """[B, C, H, W] floats in [0, 1] -> [B, H, W, C] uint8, rounded as diffusers' numpy_to_pil."""
    arr = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    return (arr * 255).round().astype("uint8")


def to_pil(arr: Any) -> Any:
    """One HWC uint8 array -> a PIL image (grayscale when it has one channel)."""
    from PIL import Image

    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
