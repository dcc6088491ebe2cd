"""Image node kinds: ``image.save`` (-> ``<id>.png``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmpipe.graphs import register
from mmpipe.graphs.base import Batch, ItemMeta, NodeKind, Port


@dataclass(kw_only=True)
class SaveConfig:
    format: str = "png"


@register
class Save(NodeKind):
    """Write each image as ``<output_dir>/<request id>.png``."""

    kind = "image.save"
    description = "Images -> PNG files."
    Config = SaveConfig
    inputs = (Port("image", "float32", ("B", 3, "H", "W")),)
    outputs = (Port("path", "str", None, collate="list"),)
    light = True

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        raise NotImplementedError("image.save runs with the image recipe issue")
