"""Compiler passes 5-8: from node pieces to stages on devices.

partition into stages -> place on devices -> wire stages and insert
transfers -> choose a schedule. Plain functions over plan dataclasses; the
driver in ``compile.py`` calls them after the graph-level passes.
"""
from __future__ import annotations

import re
from typing import Callable

from mmpipe.dsl.errors import did_you_mean
from mmpipe.dsl.plan import INPUT_STAGE, Edge, LoopPlan, PlanNode, PortSpec, Stage, Transfer, Unit
from mmpipe.dsl.schema import Problems

_DEVICE = re.compile(r"^(cpu|meta|mps|cuda|xpu)(:\d+)?$")


# ------------------------------------------------------------------ pass 5
def device_of(node: str, piece: int, placement: dict[str, str]) -> str:
    """Placement lookup: ``node.piece`` beats ``node`` beats ``default`` (then cpu)."""
    return placement.get(f"{node}.{piece}") or placement.get(node) or placement.get("default") or "cpu"


def partition_stages(nodes: dict[str, PlanNode], order: list[str], placement: dict[str, str]) -> list[Stage]:
    """Group pieces into stages: every heavy piece starts a stage, light pieces join a
    neighbour on the same device, loop pieces stand alone."""
    stages: list[Stage] = []
    pending: list[tuple[Unit, str]] = []

    def new_stage(units: list[Unit], device: str, cost: float, loop: str | None = None) -> None:
        stages.append(Stage(index=len(stages), device=device, units=units, cost=cost, loop=loop))

    def flush_pending() -> None:
        while pending:
            dev = pending[0][1]
            group = [u for u, d in pending if d == dev]
            del pending[: len(group)]
            new_stage(group, dev, 0.0)

    for name in order:
        node = nodes[name]
        total = sum(node.costs) or 1.0
        for piece, (lo, hi) in enumerate(node.pieces):
            unit, dev = Unit(name, piece, [lo, hi]), device_of(name, piece, placement)
            cost = 0.0 if node.light else round(sum(node.costs[lo:hi]) / total, 6)
            if node.light:
                last = stages[-1] if stages else None
                if last is not None and last.loop is None and last.device == dev and not pending:
                    last.units.append(unit)
                else:
                    pending.append((unit, dev))
            elif node.loop:
                flush_pending()
                new_stage([unit], dev, cost, loop=name)
            else:
                if pending and all(d == dev for _, d in pending):
                    units = [u for u, _ in pending] + [unit]
                    pending.clear()
                else:
                    flush_pending()
                    units = [unit]
                new_stage(units, dev, cost)
    flush_pending()
    return stages


# ------------------------------------------------------------------ pass 6
def place_devices(names: list[str], nodes: dict[str, PlanNode], placement: dict[str, str], problems: Problems,
                  available: Callable[[str], bool] | None = None) -> None:
    """Check the placement map (node names, piece numbers) and that every device
    exists on this machine. ``names``: every node of the recipe."""
    for key, dev in placement.items():
        pkey = f"placement.{key}"
        if key != "default":
            name, _, piece = key.partition(".")
            if name not in names:
                problems.add(pkey, f"no node '{name}'", did_you_mean(name, list(names) + ["default"]) or f"nodes are: {', '.join(names)}", key, True)
                continue
            if piece and name in nodes:
                n = nodes[name]
                if not piece.isdigit() or int(piece) >= n.split:
                    problems.add(pkey, f"'{key}' names piece {piece} but {name} has {n.split} piece(s) (split={n.split})", f"use {name}.0..{name}.{n.split - 1}, or raise nodes.{name}.split", key, True)
                    continue
        if not isinstance(dev, str) or not _DEVICE.match(dev):
            problems.add(pkey, f"'{dev}' is not a device", "use cpu, cuda, cuda:N or mps", dev, True)
            continue
        check = available or device_available
        if not check(dev):
            problems.add(pkey, f"device '{dev}' is not available on this machine", f"this machine has: {', '.join(machine_devices())}; override {pkey}=cpu", dev, True)


def machine_devices() -> list[str]:
    """Devices torch can use here (imports torch only when asked)."""
    import torch

    devs = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devs.append("mps")
    return devs


def device_available(dev: str) -> bool:
    if dev in ("cpu", "meta"):
        return True
    devs = machine_devices()
    if dev == "cuda":
        return "cuda:0" in devs
    return dev in devs


# ------------------------------------------------------------------ pass 7
def wire_stages(stages: list[Stage], nodes: dict[str, PlanNode], outputs: dict[str, str], values: dict[str, PortSpec]) -> tuple[list[Edge], dict[str, list[int]]]:
    """Edges between stages: node outputs, request inputs and carries between
    pieces. Loop nodes read their inputs on every body stage (``enter``)."""
    where: dict[tuple[str, int], int] = {(u.node, u.piece): s.index for s in stages for u in s.units}
    producer: dict[str, int] = {}
    for name, node in nodes.items():
        for p in node.out_ports:
            producer[f"{name}.{p.name}"] = where[(name, node.split - 1)]
        if not node.loop:
            for k in range(node.split - 1):
                producer[f"{name}#{k}"] = where[(name, k)]
    consumers: dict[str, set[int]] = {}
    for name, node in nodes.items():
        readers = [where[(name, k)] for k in range(node.split)] if node.loop else [where[(name, 0)]]
        for src in node.wires.values():
            consumers.setdefault(src, set()).update(readers)
        if not node.loop:
            for k in range(node.split - 1):
                consumers.setdefault(f"{name}#{k}", set()).add(where[(name, k + 1)])
    final = len(stages)
    for src in outputs.values():
        consumers.setdefault(src, set()).add(final)
    edges = []
    for key, dsts in sorted(consumers.items()):
        src = INPUT_STAGE if key.startswith("inputs.") else producer.get(key, INPUT_STAGE)
        spec = values.get(key)
        for d in sorted(dsts):
            if d != src:
                edges.append(Edge(key, src, d, spec.dtype if spec else "any", spec.shape if spec else None))
    for s in stages:
        s.reads = sorted({e.key for e in edges if e.dst_stage == s.index})
    return edges, {k: sorted(v) for k, v in sorted(consumers.items())}


def insert_transfers(stages: list[Stage], edges: list[Edge]) -> list[Transfer]:
    """A transfer for every edge whose two stages sit on different devices."""
    out = []
    for e in edges:
        if 0 <= e.src_stage < len(stages) and e.dst_stage < len(stages):
            a, b = stages[e.src_stage].device, stages[e.dst_stage].device
            if a != b:
                out.append(Transfer(e.key, e.src_stage, e.dst_stage, a, b))
    return out


# ------------------------------------------------------------------ pass 8
def choose_schedule(stages: list[Stage]) -> str:
    """``loop-reentry`` when a loop body is pipelined, else ``streaming``."""
    return "loop-reentry" if any(s.loop for s in stages) else "streaming"


def loops_of(stages: list[Stage]) -> list[LoopPlan]:
    out: dict[str, list[int]] = {}
    for s in stages:
        if s.loop:
            out.setdefault(s.loop, []).append(s.index)
    return [LoopPlan(k, v) for k, v in out.items()]
