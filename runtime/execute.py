"""Running node pieces on micro-batches: shared by every executor.

``run_unit`` runs one non-loop piece; ``LoopBody`` holds the lanes of one loop
piece; ``expand_items`` applies a fan-out (``_parent``); ``finished_rows``
splits a finished micro-batch into per-request output rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from mmpipe.dsl.plan import Plan, Unit
from mmpipe.graphs.base import ItemMeta, LoopKind, NodeKind, select_rows
from mmpipe.runtime.batch import MicroBatch, collate, row, spec_of, to_device


class NodeError(Exception):
    """A node raised: carries the stage, node and the request ids involved."""

    def __init__(self, stage: int, node: str, request_ids: list[str], cause: BaseException) -> None:
        self.stage, self.node, self.request_ids, self.cause = stage, node, request_ids, cause
        super().__init__(f"stage {stage}, node {node}: {type(cause).__name__}: {cause}")

    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self.cause).__name__, "message": str(self.cause), "stage": self.stage, "node": self.node, "requests": self.request_ids}


def node_inputs(plan: Plan, node: str, mb: MicroBatch) -> dict[str, Any]:
    """The node's input ports, taken from the micro-batch's values."""
    return {port: mb.values[src] for port, src in plan.nodes[node].wires.items() if src in mb.values}


def run_unit(plan: Plan, unit: Unit, inst: NodeKind, mb: MicroBatch, device: Any) -> "MicroBatch | Stream":
    """Run a non-loop piece: node inputs (first piece) or the carry in, outputs or carry out.
    A streaming expansion returns a ``Stream`` of micro-batches instead."""
    pn = plan.nodes[unit.node]
    if unit.piece == 0:
        x = node_inputs(plan, unit.node, mb)
    else:
        x = mb.values.pop(f"{unit.node}#{unit.piece - 1}")
    out = inst.forward(to_device(x, device), mb.items)
    if unit.piece < pn.split - 1:
        mb.values[f"{unit.node}#{unit.piece}"] = out
        return mb
    if pn.expands and not isinstance(out, dict):
        return Stream(plan, unit.node, mb, out)
    parents = out.pop("_parent", None) if pn.expands else None
    if parents is not None:
        mb = expand_items(mb, list(parents))
    return with_outputs(plan, unit.node, mb, out)


def with_outputs(plan: Plan, node: str, mb: MicroBatch, out: dict[str, Any]) -> MicroBatch:
    for p in plan.nodes[node].out_ports:
        if p.name in out:
            mb.values[f"{node}.{p.name}"] = out[p.name]
    return mb


def expand_items(mb: MicroBatch, parents: list[int], start: dict[int, int] | None = None, of: int | None = None) -> MicroBatch:
    """Fan-out: output row r belongs to input item ``parents[r]``; renumber sub-items
    (from ``start[parent]``; ``of``: the count when not all rows are here, 0 = not known yet)."""
    counts: dict[int, int] = {}
    for p in parents:
        counts[p] = counts.get(p, 0) + 1
    seen: dict[int, int] = dict(start or {})
    items = []
    for p in parents:
        k = seen.get(p, 0)
        seen[p] = k + 1
        src = mb.items[p]
        items.append(ItemMeta(src.request_id, sub=k, of=counts[p] if of is None else of, params=src.params))
    return MicroBatch(items, {k: select_rows(v, parents) for k, v in mb.values.items()}, id=mb.id)


class Stream:
    """The micro-batches a streaming expansion makes, one chunk at a time.

    Items carry ``of=0`` (count not known yet); once the chunks are exhausted,
    ``counts`` holds each request's number of items (0 for one that produced none).
    """

    def __init__(self, plan: Plan, node: str, mb: MicroBatch, chunks: Iterator[dict[str, Any]]) -> None:
        self.plan, self.node, self.mb, self.chunks = plan, node, mb, chunks
        self.made: dict[int, int] = {}  # input row -> items made so far
        self.counts: dict[str, int] | None = None

    def __iter__(self) -> Iterator[MicroBatch]:
        for out in self.chunks:
            parents = list(out.pop("_parent"))
            if not parents:
                continue
            chunk = expand_items(self.mb, parents, self.made, of=0)
            for p in parents:
                self.made[p] = self.made.get(p, 0) + 1
            yield with_outputs(self.plan, self.node, chunk, out)
        counts: dict[str, int] = {}
        for i, m in enumerate(self.mb.items):
            counts[m.request_id] = counts.get(m.request_id, 0) + self.made.get(i, 0)
        self.counts = counts

    def collect(self) -> MicroBatch:
        """Every chunk in one micro-batch, with the final counts (the sequential executor)."""
        parts = list(self)
        assert self.counts is not None
        if not parts:
            return MicroBatch([], {}, id=self.mb.id)
        whole = MicroBatch.join(parts)
        whole.items = [ItemMeta(m.request_id, sub=m.sub, of=self.counts[m.request_id], params=m.params) for m in whole.items]
        whole.id = self.mb.id
        return whole


@dataclass
class LoopBody:
    """One piece of a loop node with the lanes (per-item state) it owns.

    A lane is keyed by item key and tagged with the item's entry number (``gen``):
    an item that enters again (a retry) gets a new number, so a stale lane, or a
    late request to free one, is told apart from the new lane.
    """

    unit: Unit
    inst: LoopKind
    device: Any
    lanes: dict[str, dict[str, Any]] = field(default_factory=dict)
    gens: dict[str, int] = field(default_factory=dict)

    def lanes_for(self, items: list[ItemMeta]) -> list[dict[str, Any]]:
        return [self.lanes[m.key] for m in items]

    def is_new(self, m: ItemMeta, gen: int | None) -> bool:
        return m.key not in self.lanes or (gen is not None and self.gens.get(m.key) != gen)

    def enter(self, x: dict[str, Any], items: list[ItemMeta], gens: list[int] | None = None) -> None:
        stale = [m for m in items if m.key in self.lanes]
        if stale:
            self.finish(stale)
        for i, m in enumerate(items):
            self.lanes[m.key] = {}
            if gens is not None:
                self.gens[m.key] = gens[i]
        self.inst.enter(to_device(x, self.device), items, self.lanes_for(items))

    def step(self, carry: dict[str, Any], items: list[ItemMeta]) -> dict[str, Any]:
        return self.inst.step(to_device(carry, self.device), items, self.lanes_for(items))

    def finish(self, items: list[ItemMeta], gens: list[int] | None = None) -> None:
        """Free the lanes of these items (only the entry ``gens`` names, when given)."""
        lanes = []
        for i, m in enumerate(items):
            if m.key in self.lanes and (gens is None or self.gens.get(m.key) == gens[i]):
                lanes.append(self.lanes.pop(m.key))
                self.gens.pop(m.key, None)
        if lanes:
            self.inst.finish(lanes)


def loop_exit(plan: Plan, node: str, mb_items: list[ItemMeta], outs: dict[str, Any], done_rows: list[int]) -> dict[int, dict[str, Any]]:
    """Per-item output rows (node.port -> value) of the items that finished."""
    pn = plan.nodes[node]
    res: dict[int, dict[str, Any]] = {}
    for i in done_rows:
        res[i] = {f"{node}.{p.name}": row(outs[p.name], i) for p in pn.out_ports if p.name in outs}
    return res


def retire_done(plan: Plan, node: str, bodies: list[LoopBody], carry: dict[str, Any], items: list[ItemMeta], active: list[int],
                done: list[bool], outs: dict[str, Any], finished: dict[int, dict[str, Any]]) -> tuple[dict[str, Any], list[int]]:
    """One loop iteration's finished items, run in one thread (sequential executor, profiler):
    their outputs go to ``finished`` (by index in the micro-batch), their lanes are freed and
    they leave the carry. Returns the carry and the still-active indices."""
    done_rows = [i for i, d in enumerate(done) if d]
    for local, vals in loop_exit(plan, node, items, outs, done_rows).items():
        finished[active[local]] = vals
    if not done_rows:
        return carry, active
    gone = [items[i] for i in done_rows]
    for b in bodies:
        b.finish(gone)
    keep = [i for i, d in enumerate(done) if not d]
    return bodies[-1].inst.select(carry, keep), [active[i] for i in keep]


def rows_to_batch(plan: Plan, items: list[ItemMeta], rows: list[dict[str, Any]]) -> MicroBatch:
    """Per-item value dicts -> a micro-batch (collated by each key's port spec)."""
    keys = rows[0].keys() if rows else []
    return MicroBatch(list(items), {k: collate([r[k] for r in rows], spec_of(plan, k)) for k in keys})

