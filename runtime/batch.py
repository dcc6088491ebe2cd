"""Micro-batches: collating per-item values, splitting them back, moving devices.

A ``MicroBatch`` carries its items' metadata and a dict of *batched* values
(value key -> tensor with the batch first, or a list with one entry per item).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from mmpipe.dsl.plan import Plan, PortSpec
from mmpipe.graphs.base import ItemMeta, concat_rows, select_rows

_INPUT_COLLATE = {"tensor": "stack", "int": "stack", "float": "stack"}
_ids = itertools.count()


def spec_of(plan: Plan, key: str) -> PortSpec:
    """How values under ``key`` are batched (from the producing port or input type)."""
    head, _, port = key.partition(".")
    if head == "inputs":
        t = plan.inputs.get(port, {}).get("type", "any")
        return PortSpec(port, t, None, _INPUT_COLLATE.get(t, "list"))
    node = plan.nodes.get(head)
    if node is not None:
        for p in node.out_ports:
            if p.name == port:
                return p
    return PortSpec(port, "any", None, "list")


def collate(rows: list[Any], spec: PortSpec) -> Any:
    """Per-item values -> one batched value, following the port's ``collate``."""
    if spec.collate == "list":
        return list(rows)
    import torch

    ts = [r if isinstance(r, torch.Tensor) else torch.as_tensor(r) for r in rows]
    if spec.collate == "pad" and ts and any(t.shape != ts[0].shape for t in ts):
        n = max(t.shape[-1] for t in ts)
        ts = [torch.nn.functional.pad(t, (0, n - t.shape[-1]), value=spec.pad_value) for t in ts]
    return torch.stack(ts, 0)


def row(value: Any, i: int) -> Any:
    """Item ``i`` of a batched value."""
    if isinstance(value, dict):
        return {k: row(v, i) for k, v in value.items()}
    return value[i]


def to_device(value: Any, device: Any, non_blocking: bool = False) -> Any:
    """Move every tensor inside ``value`` to ``device`` (lists/dicts/tuples followed)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return value
    if isinstance(value, torch.Tensor):
        return value if value.device == torch.device(device) else value.to(device, non_blocking=non_blocking)
    if isinstance(value, list):
        return [to_device(v, device, non_blocking) for v in value]
    if isinstance(value, tuple):
        return tuple(to_device(v, device, non_blocking) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device, non_blocking) for k, v in value.items()}
    return value


@dataclass
class MicroBatch:
    """Items travelling together, with their batched values."""

    items: list[ItemMeta]
    values: dict[str, Any] = field(default_factory=dict)
    id: int = field(default_factory=lambda: next(_ids))

    def __len__(self) -> int:
        return len(self.items)

    def select(self, rows: list[int]) -> "MicroBatch":
        """A micro-batch of some of the items (same values, those rows)."""
        return MicroBatch([self.items[i] for i in rows], {k: select_rows(v, rows) for k, v in self.values.items()})

    @staticmethod
    def join(parts: list["MicroBatch"]) -> "MicroBatch":
        """Items of several micro-batches together (values concatenated)."""
        if len(parts) == 1:
            return parts[0]
        keys = set(parts[0].values)
        return MicroBatch([m for p in parts for m in p.items], {k: concat_rows([p.values[k] for p in parts]) for k in keys})


def from_requests(plan: Plan, requests: list[Any], keys: list[str]) -> MicroBatch:
    """A micro-batch from ``Request`` objects: the ``inputs.*`` values in ``keys``."""
    items = [ItemMeta(r.id, params=dict(r.params)) for r in requests]
    values = {}
    for key in keys:
        field_ = key.split(".", 1)[1]
        values[key] = collate([r.values.get(field_) for r in requests], spec_of(plan, key))
    return MicroBatch(items, values)
