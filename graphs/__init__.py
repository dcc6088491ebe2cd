"""Node kinds, one module per family, registered under dotted names.

Family modules are imported lazily and must not import torch/transformers at
module level, so that ``mmpipe validate`` and ``mmpipe plan`` start fast.
"""
from __future__ import annotations

import importlib
import typing
from typing import TypeVar

from mmpipe.graphs.base import (  # noqa: F401  (re-exported)
    Batch,
    ItemMeta,
    LoopKind,
    NodeKind,
    Port,
    Request,
    SourceError,
    SourceKind,
)

# family prefix -> module defining its kinds
FAMILIES: dict[str, str] = {
    "synthetic": "mmpipe.graphs.synthetic",
    "audio": "mmpipe.graphs.audio",
    "whisper": "mmpipe.graphs.whisper",
    "text": "mmpipe.graphs.text",
    "diffusion": "mmpipe.graphs.diffusion",
    "image": "mmpipe.graphs.image",
}

_KINDS: dict[str, type[NodeKind]] = {}
_SOURCES: dict[str, type[SourceKind]] = {}
_LOADED: set[str] = set()

K = TypeVar("K", bound=type)


def register(cls: K) -> K:
    """Class decorator: register a node or source kind under ``cls.kind``."""
    name = getattr(cls, "kind", "")
    if not name or "." not in name:
        raise ValueError(f"{cls.__name__}.kind must be a dotted name, got {name!r}")
    if issubclass(cls, SourceKind):
        _SOURCES[name] = cls
    else:
        _KINDS[name] = typing.cast("type[NodeKind]", cls)
    return cls


def _load_family(prefix: str) -> None:
    if prefix in _LOADED or prefix not in FAMILIES:
        return
    _LOADED.add(prefix)
    importlib.import_module(FAMILIES[prefix])


def _load_all() -> None:
    for prefix in FAMILIES:
        _load_family(prefix)


def get_kind(name: str) -> type[NodeKind] | None:
    """The node kind registered as ``name``, or None."""
    _load_family(name.split(".", 1)[0])
    return _KINDS.get(name)


def get_source(name: str) -> type[SourceKind] | None:
    """The request source registered as ``name``, or None."""
    _load_family(name.split(".", 1)[0])
    return _SOURCES.get(name)


def kind_names() -> list[str]:
    _load_all()
    return sorted(_KINDS)


def source_names() -> list[str]:
    _load_all()
    return sorted(_SOURCES)


def load_target(target: str) -> type[NodeKind]:
    """Import a user-defined kind from ``module.Class`` (allow-list checked by the caller)."""
    module, _, name = target.rpartition(".")
    obj = getattr(importlib.import_module(module), name)
    if not (isinstance(obj, type) and issubclass(obj, NodeKind)):
        raise TypeError(f"{target} is not a NodeKind subclass")
    return obj
