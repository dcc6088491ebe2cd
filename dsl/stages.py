"""Compiler passes 5-8: from node pieces to stages on devices.

partition into stages -> place on devices -> wire stages and insert
transfers -> choose a schedule. Plain functions over plan dataclasses; the
driver in ``compile.py`` calls them after the graph-level passes.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from mmpipe.dsl.errors import did_you_mean
from mmpipe.dsl.plan import INPUT_STAGE, Edge, LoopPlan, Place, PlanNode, PortSpec, Stage, Transfer, Unit
from mmpipe.dsl.schema import Problems

_DEVICE = re.compile(r"^(cpu|meta|mps|cuda|xpu)(:\d+)?$")
_RANK = re.compile(r"^rank(\d+)(?::(.*))?$")
UNRANKED = -1  # a place whose rank the compiler picks (spread_ranks)
# Where a piece runs, one entry per replica: (rank or UNRANKED, device).
Places = tuple[tuple[int, str], ...]


# ------------------------------------------------------------------ pass 5
def device_of(node: str, piece: int, placement: dict[str, Any]) -> Any:
    """Placement lookup: ``node.piece`` beats ``node`` beats ``default`` (then cpu)."""
    return placement.get(f"{node}.{piece}") or placement.get(node) or placement.get("default") or "cpu"


def parse_place(value: str, default_device: str = "cpu") -> tuple[int, str] | None:
    """``cuda:1`` -> (UNRANKED, cuda:1); ``rank2`` -> (2, default device); ``rank2:cuda:0`` -> (2, cuda:0).
    None when it is not a place."""
    m = _RANK.match(value)
    rank, dev = (int(m.group(1)), m.group(2) or default_device) if m else (UNRANKED, value)
    return (rank, dev) if _DEVICE.match(dev) else None


def places_of(node: PlanNode, piece: int, placement: dict[str, Any]) -> Places:
    """The places of one piece: a placement list names one per replica; a single value
    serves every replica."""
    default = placement.get("default")
    default_dev = (parse_place(default) or (UNRANKED, "cpu"))[1] if isinstance(default, str) else "cpu"
    raw = device_of(node.name, piece, placement)
    values = list(raw) if isinstance(raw, (list, tuple)) else [raw] * node.replicas
    return tuple(parse_place(str(v), default_dev) or (UNRANKED, "cpu") for v in values)


def partition_stages(nodes: dict[str, PlanNode], order: list[str], placement: dict[str, Any], problems: Problems | None = None) -> list[Stage]:
    """Group pieces into stages: every heavy piece starts a stage, light pieces join a
    neighbour in the same place(s), loop pieces stand alone, except that a loop node with
    ``with_previous`` takes the stage before it in as its first stage's prelude (see
    ``check_with_previous``; ``problems`` gets a prelude that cannot join). Light nodes
    that turn items into several stay out of a prelude, in a stage of their own."""
    stages: list[Stage] = []
    pending: list[tuple[Unit, Places]] = []

    def new_stage(units: list[Unit], where: Places, cost: float, loop: str | None = None) -> None:
        owner = loop or next((u.node for u in units if not nodes[u.node].light), units[0].node)
        reps = [Place(r, d) for r, d in where]
        stages.append(Stage(index=len(stages), device=reps[0].device, units=units, cost=cost, loop=loop, rank=reps[0].rank,
                            replicas=reps, owner=owner))

    def key(st: Stage) -> Places:
        return tuple((p.rank, p.device) for p in st.places)

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
            unit, dev = Unit(name, piece, [lo, hi]), places_of(node, piece, placement)
            cost = 0.0 if node.light else round(sum(node.costs[lo:hi]) / total, 6)
            if node.light:
                last = stages[-1] if stages else None
                if last is not None and last.loop is None and key(last) == dev and not pending:
                    last.units.append(unit)
                else:
                    pending.append((unit, dev))
            elif node.loop and piece == 0 and node.with_previous and stages and stages[-1].loop is None:
                prev = stages.pop()
                if key(prev) != dev or any(d != dev for _, d in pending):
                    if problems is not None:
                        problems.add(f"nodes.{name}.with_previous", f"{name}'s first piece and the stage before it ({', '.join(u.node for u in prev.units)}) are placed apart",
                                     f"place them together (placement.{name} and the nodes before it), or remove nodes.{name}.with_previous", True, True)
                    stages.append(prev)
                    flush_pending()
                    new_stage([unit], dev, cost, loop=name)
                    continue
                units = prev.units + [u for u, _ in pending]
                # the loop admits whole items: what turns an item into several (a light fan-out
                # before the heavy node) keeps a stage of its own in front of the loop
                cut = max((k + 1 for k, u in enumerate(units) if nodes[u.node].expands), default=0)
                heavy = prev.owner
                if cut and not any(u.node == heavy for u in units[cut:]):
                    if problems is not None:
                        problems.add(f"nodes.{name}.with_previous", f"{name}'s first stage would take in {units[cut - 1].node}, which turns each item into several, "
                                     "and a loop admits whole items", f"remove nodes.{name}.with_previous", True, True)
                    cut = 0
                if cut:
                    new_stage(units[:cut], dev, 0.0)
                new_stage(units[cut:] + [unit], dev, round(prev.cost + cost, 6), loop=name)
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


def previous_heavy(nodes: dict[str, PlanNode], order: list[str], name: str) -> str | None:
    """The last heavy node before ``name`` in the recipe's order (None: there is none)."""
    before = [n for n in order[: order.index(name)] if n in nodes and not nodes[n].light]
    return before[-1] if before else None


def check_with_previous(nodes: dict[str, PlanNode], order: list[str], problems: Problems) -> None:
    """``nodes.X.with_previous``: X is a loop node, a heavy non-loop node comes before it, and
    neither has copies (the runtime keeps a copy's pieces together per node)."""
    for name, node in nodes.items():
        if not node.with_previous:
            continue
        key = f"nodes.{name}.with_previous"
        prev = previous_heavy(nodes, order, name)
        if not node.loop:
            problems.add(key, f"{name} ({node.kind}) is not a loop node: only a loop's first stage takes in the stage before it",
                         f"remove {key}", True, True)
        elif prev is None or nodes[prev].loop:
            problems.add(key, f"no heavy node that is not a loop comes before {name}" + (f" ({prev} is a loop)" if prev else ""),
                         f"remove {key}", True, True)
        elif node.replicas > 1 or nodes[prev].replicas > 1:
            problems.add(key, f"{name} and {prev} share a stage, so they cannot have copies (replicas) of their own",
                         f"remove {key}, or the replicas of {name} and {prev}", True, True)


# ------------------------------------------------------------------ pass 6
def place_devices(names: list[str], nodes: dict[str, PlanNode], placement: dict[str, Any], problems: Problems,
                  available: Callable[[str], bool] | None = None, nproc: int = 1, distributed: bool = False) -> None:
    """Check the placement map (node names, piece numbers, places, replica counts) and,
    in one process, that every device exists on this machine (a distributed run checks
    each rank's devices on that rank when it starts). ``names``: every node of the recipe."""
    check = available or device_available
    for key, value in placement.items():
        pkey = f"placement.{key}"
        name, _, piece = key.partition(".")
        if key != "default":
            if name not in names:
                problems.add(pkey, f"no node '{name}'", did_you_mean(name, list(names) + ["default"]) or f"nodes are: {', '.join(names)}", key, True)
                continue
            if piece and name in nodes:
                n = nodes[name]
                if not piece.isdigit() or int(piece) >= n.split:
                    problems.add(pkey, f"'{key}' names piece {piece} but {name} has {n.split} piece(s) (split={n.split})", f"use {name}.0..{name}.{n.split - 1}, or raise nodes.{name}.split", key, True)
                    continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, (list, tuple)) and len(values) > 1:
            if name in nodes and nodes[name].replicas == 1:
                nodes[name].replicas = len(values)  # a list of places asks for that many copies
            reps = nodes[name].replicas if name in nodes else len(values)
            if key == "default":
                problems.add(pkey, "placement.default takes one place, not a list", "give replica places per node: placement.NODE=[...]", value, True)
            elif reps != len(values):
                problems.add(pkey, f"{len(values)} places for {reps} replica(s) of {name}", f"list one place per replica, or set nodes.{name}.replicas={len(values)}", value, True)
        for v in values:
            place = parse_place(v) if isinstance(v, str) else None
            if place is None:
                problems.add(pkey, f"'{v}' is not a place", "use a device (cpu, cuda, cuda:N, mps), rankK or rankK:DEVICE", v, True)
                continue
            rank, dev = place
            if rank != UNRANKED and not distributed:
                problems.add(pkey, f"'{v}' names a rank, but the runtime runs in one process", "add runtime=distributed runtime.nproc=N, or give a device only", v, True)
            elif rank >= nproc:
                problems.add(pkey, f"rank {rank} does not exist: runtime.nproc={nproc} gives ranks 0..{nproc - 1}", f"raise runtime.nproc to {rank + 1} or use rank0..rank{nproc - 1}", v, True)
            if not distributed and not check(dev):
                problems.add(pkey, f"device '{dev}' is not available on this machine", f"this machine has: {', '.join(machine_devices())}; override {pkey}=cpu", dev, True)
    for name, node in nodes.items():
        if node.replicas > 1 and node.loop is False and node.light:
            problems.add(f"nodes.{name}.replicas", f"{name} is a light node ({node.kind}): it shares a neighbour's stage and has no copies of its own",
                         f"remove nodes.{name}.replicas", node.replicas, True)


def spread_ranks(stages: list[Stage], nproc: int, problems: Problems) -> None:
    """Give every place without a rank one: stages in contiguous groups balanced by cost,
    replica k of a stage on the group's rank + k. Every rank must get a stage."""
    if any(p.rank == UNRANKED for st in stages for p in st.places):
        if len(stages) < nproc:
            problems.add("runtime.nproc", f"{len(stages)} stage(s) cannot be spread over {nproc} ranks",
                         f"split nodes further (nodes.NODE.split), add replicas, or set runtime.nproc={len(stages)}", nproc, True)
            return
        from mmpipe.dsl.compile import balanced_ranges

        # light stages cost nothing: a small weight keeps them with a neighbour, not alone
        groups = balanced_ranges([max(st.cost, 1e-3) for st in stages], nproc)
        for rank, (lo, hi) in enumerate(groups):
            for st in stages[lo:hi]:
                for k, p in enumerate(st.places):
                    if p.rank == UNRANKED:
                        p.rank = (rank + k) % nproc
    for st in stages:
        st.replicas = st.places
        st.rank, st.device = st.replicas[0].rank, st.replicas[0].device
    used = {p.rank for st in stages for p in st.places}
    idle = [r for r in range(nproc) if r not in used]
    if idle:
        problems.add("placement", f"rank(s) {', '.join(map(str, idle))} would run no stage", f"place a stage there (e.g. placement.NODE=rank{idle[0]}) or lower runtime.nproc")


def single_process(stages: list[Stage]) -> None:
    """One process: every place is on rank 0."""
    for st in stages:
        for p in st.places:
            p.rank = 0
        st.replicas = st.places
        st.rank = 0


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
        src_stage = INPUT_STAGE if key.startswith("inputs.") else producer.get(key, INPUT_STAGE)
        spec = values.get(key)
        for d in sorted(dsts):
            if d != src_stage:
                edges.append(Edge(key, src_stage, d, spec.dtype if spec else "any", spec.shape if spec else None))
    for s in stages:
        s.reads = sorted({e.key for e in edges if e.dst_stage == s.index})
    return edges, {k: sorted(v) for k, v in sorted(consumers.items())}


def insert_transfers(stages: list[Stage], edges: list[Edge], ranked: bool = False) -> list[Transfer]:
    """A transfer for every edge between stages on different devices (or ranks).
    ``ranked``: name places as ``rankK:DEVICE`` (distributed runs)."""
    out = []

    def name(st: Stage) -> str:
        names = [f"rank{p.rank}:{p.device}" if ranked else p.device for p in st.places]
        return names[0] if len(names) == 1 else "[" + ", ".join(names) + "]"

    for e in edges:
        if 0 <= e.src_stage < len(stages) and e.dst_stage < len(stages):
            a, b = stages[e.src_stage], stages[e.dst_stage]
            if {(p.rank, p.device) for p in a.places} != {(p.rank, p.device) for p in b.places}:
                out.append(Transfer(e.key, e.src_stage, e.dst_stage, name(a), name(b)))
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
