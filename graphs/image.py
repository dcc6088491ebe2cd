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
    inputs = (Port("image", "float32", ("B", "C", "H", "W")),)
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
        paths = []
        for img, m in zip(to_uint8(x["image"]), meta):
            name = m.request_id if m.of == 1 else f"{m.request_id}-{m.sub}"
            path = out_dir / f"{name}.{self.cfg.format}"
            to_pil(img).save(path)
            paths.append(str(path))
        return {"path": paths}


def to_uint8(images: Any) -> Any:
    """[B, C, H, W] floats in [0, 1] -> [B, H, W, C] uint8, rounded as diffusers' numpy_to_pil."""
    arr = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    return (arr * 255).round().astype("uint8")


def to_pil(arr: Any) -> Any:
    """One HWC uint8 array -> a PIL image (grayscale when it has one channel)."""
    from PIL import Image

    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
