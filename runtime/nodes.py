"""Build node-kind instances for the pieces of a plan (weights load here)."""
from __future__ import annotations

from typing import Any

from mmpipe.dsl.plan import Plan, Unit
from mmpipe.graphs import get_kind, load_target
from mmpipe.graphs.base import NodeKind, make_config


def kind_class(plan: Plan, node: str) -> type[NodeKind]:
    """The kind class of a plan node (registry, or an allowed ``_target_``)."""
    pn = plan.nodes[node]
    if pn.target:
        if not any(pn.target == a or pn.target.startswith(a.rstrip(".") + ".") for a in plan.allow_targets):
            raise PermissionError(f"_target_ {pn.target} is not in the plan's allow_targets")
        return load_target(pn.target)
    cls = get_kind(pn.kind)
    if cls is None:
        raise KeyError(f"unknown node kind {pn.kind}")
    return cls


def build_unit(plan: Plan, unit: Unit, device: str, output_dir: str | None = None) -> NodeKind:
    """Instantiate and ``setup`` one piece of a node on ``device``."""
    import torch

    pn = plan.nodes[unit.node]
    cls = kind_class(plan, unit.node)
    cfg = make_config(cls.Config, pn.config)
    inst = cls(cfg, range(unit.parts[0], unit.parts[1]), pn.num_parts)
    inst.output_dir = output_dir  # type: ignore[attr-defined]
    inst.seed = plan.seed  # type: ignore[attr-defined]
    dtype: Any = getattr(torch, plan.runtime.get("dtype", "float32"))
    inst.setup(torch.device(device), dtype)
    return inst
