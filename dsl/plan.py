"""The compiled plan: plain dataclasses, JSON round-trip, text table and Mermaid.

The runtime imports only this module from ``dsl``. A plan names, for every
stage, its device, the node pieces it runs, the values it reads and where each
value it produces must go, so executors need no graph logic of their own.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

PLAN_VERSION = 1
INPUT_STAGE = -1  # producer stage of request inputs


@dataclass
class PortSpec:
    name: str
    dtype: str
    shape: list[int | str] | None
    collate: str = "stack"
    pad_value: float = 0.0
    optional: bool = False


@dataclass
class PlanNode:
    """A node with its kind, typed config (as plain data) and resolved ports."""

    name: str
    kind: str
    target: str | None
    config: dict[str, Any]
    wires: dict[str, str]
    in_ports: list[PortSpec]
    out_ports: list[PortSpec]
    num_parts: int
    split: int
    pieces: list[list[int]]  # [lo, hi) part ranges, one per piece
    costs: list[float]
    loop: bool = False
    light: bool = False
    expands: bool = False
    replicas: int = 1
    # a loop node: its first body stage also runs the stage that holds the last piece of
    # the heavy node before it (a *prelude*, which items run as they enter the loop)
    with_previous: bool = False

    def piece_key(self, piece: int) -> str:
        return self.name if self.split == 1 else f"{self.name}.{piece}"


@dataclass
class Unit:
    """One piece of one node, run inside a stage."""

    node: str
    piece: int
    parts: list[int]  # [lo, hi)


@dataclass
class Place:
    """Where one copy of a stage runs: a rank (process; 0 in one process) and a device."""

    rank: int
    device: str


@dataclass
class Stage:
    index: int
    device: str  # replica 0's device
    units: list[Unit]
    cost: float
    loop: str | None = None  # name of the loop node whose body piece this stage runs
    reads: list[str] = field(default_factory=list)  # value keys this stage needs from earlier stages/inputs
    rank: int = 0  # replica 0's rank
    # One entry per copy of the stage (``nodes.X.replicas``); every copy has its own weights.
    replicas: list[Place] = field(default_factory=list)
    # The node whose copies these are: its stages share one replica choice per request,
    # so the pieces of one copy form a chain (loop lanes stay with their copy).
    owner: str = ""

    @property
    def places(self) -> list[Place]:
        return self.replicas or [Place(self.rank, self.device)]

    @property
    def loop_unit(self) -> Unit:
        """A loop stage's loop piece: its last unit (the units before it are the prelude)."""
        assert self.loop is not None and self.units[-1].node == self.loop, f"stage {self.index} is not a loop stage"
        return self.units[-1]

    @property
    def prelude(self) -> list[Unit]:
        """The non-loop units a loop's first body stage runs before items begin the loop."""
        return self.units[:-1] if self.loop else []


@dataclass
class Edge:
    """A value flowing from its producer to a consuming stage."""

    key: str  # "node.port", "inputs.field" or "node#piece" (carry between pieces)
    src_stage: int
    dst_stage: int
    dtype: str
    shape: list[int | str] | None


@dataclass
class Transfer:
    key: str
    src_stage: int
    dst_stage: int
    src_device: str
    dst_device: str


@dataclass
class LoopPlan:
    node: str
    stages: list[int]


@dataclass
class Plan:
    """Everything an executor needs; plain data, printable, JSON round-trippable."""

    recipe: str
    file: str
    description: str
    inputs: dict[str, dict[str, Any]]
    outputs: dict[str, str]
    source: dict[str, Any] | None
    nodes: dict[str, PlanNode]
    order: list[str]
    stages: list[Stage]
    edges: list[Edge]
    transfers: list[Transfer]
    loops: list[LoopPlan]
    consumers: dict[str, list[int]]  # value key -> stages that read it (len(stages) = final outputs)
    batching: dict[str, Any]
    runtime: dict[str, Any]
    schedule: str
    trace: str | None
    output_dir: str
    seed: int
    allow_targets: list[str] = field(default_factory=list)
    version: int = PLAN_VERSION
    # Predicted per-stage time and memory, balance, throughput, bubble (``dsl/predict.py``);
    # None when the recipe neither gives a profile nor asks for the balancer.
    predicted: dict[str, Any] | None = None

    # ------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False, default=str)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return typing.cast("Plan", _from_data(cls, json.loads(text)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        return typing.cast("Plan", _from_data(cls, data))

    # ------------------------------------------------------------ views
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage_label(self, s: Stage) -> str:
        return " + ".join(self.nodes[u.node].piece_key(u.piece) + _parts(u, self.nodes[u.node]) for u in s.units)

    @property
    def distributed(self) -> bool:
        return self.runtime.get("backend") == "distributed"

    @property
    def nproc(self) -> int:
        return int(self.runtime.get("nproc", 1)) if self.distributed else 1

    def where(self, s: Stage) -> str:
        """``cpu``, ``rank1:cuda:0``, or ``[rank0:cpu, rank1:cpu]`` for a replicated stage."""
        fmt = (lambda p: f"rank{p.rank}:{p.device}") if self.distributed else (lambda p: p.device)
        places = s.places
        return fmt(places[0]) if len(places) == 1 else "[" + ", ".join(fmt(p) for p in places) + "]"

    def to_text(self) -> str:
        """A table of stages, devices and pieces, then transfers and loops."""
        rows = [("stage", "device", "runs", "cost share", "reads")]
        for s in self.stages:
            rows.append((str(s.index), self.where(s), self.stage_label(s) + (" [loop]" if s.loop else ""), f"{s.cost:g}", ", ".join(s.reads) or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"plan for recipe '{self.recipe}' ({self.file}): {self.num_stages} stages, schedule {self.schedule}",
                 "  (cost share: a stage's part of its node's cost hints, not seconds: `mmpipe profile` measures)"]
        for i, r in enumerate(rows):
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if i == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        if self.transfers:
            lines.append("transfers:")
            lines += [f"  {t.key}: stage {t.src_stage} ({t.src_device}) -> stage {t.dst_stage} ({t.dst_device})" for t in self.transfers]
        for lp in self.loops:
            lines.append(f"loop {lp.node}: body on stages {lp.stages}; items re-enter stage {lp.stages[0]} until done")
        rt, b = self.runtime, self.batching
        lines.append(f"batching: max_batch_size={b['max_batch_size']} max_delay_ms={b['max_delay_ms']}; runtime: backend={rt['backend']}"
                     + (f" nproc={self.nproc}" if self.distributed else "") + f" microbatch_size={rt['microbatch_size']} queue_depth={rt['queue_depth']}")
        return "\n".join(lines)

    def unit_edges(self) -> list[tuple[tuple[str, int] | None, tuple[str, int] | None, str]]:
        """Value edges between node pieces, ``(producer, consumer, key)``: None stands for the
        request inputs (as producer) or the recipe outputs (as consumer). Includes edges
        inside a stage; each edge once."""
        producer: dict[str, tuple[str, int]] = {}
        for name, n in self.nodes.items():
            for p in n.out_ports:
                producer[f"{name}.{p.name}"] = (name, n.split - 1)
            for k in range(n.split - 1):
                producer[f"{name}#{k}"] = (name, k)
        out: list[tuple[tuple[str, int] | None, tuple[str, int] | None, str]] = []
        for name in self.order:
            n = self.nodes[name]
            readers = range(n.split) if n.loop else [0]
            for src in dict.fromkeys(n.wires.values()):
                for k in readers:
                    out.append((producer.get(src), (name, k), src))
            if not n.loop:
                out += [((name, k), (name, k + 1), f"{name}#{k}") for k in range(n.split - 1)]
        out += [(producer.get(src), None, src) for src in dict.fromkeys(self.outputs.values())]
        return out

    def to_mermaid(self) -> str:
        """A Mermaid flowchart: one subgraph per stage (with its place), an edge per value
        from the piece that makes it to each piece that reads it."""
        ids: dict[tuple[str, int], str] = {}
        lines = ["flowchart LR", "  inputs([inputs])"]
        for s in self.stages:
            lines.append(f'  subgraph S{s.index}["stage {s.index} @ {self.where(s)}"]')
            for u in s.units:
                nid = f"n_{u.node}_{u.piece}".replace(".", "_").replace("-", "_")
                ids[(u.node, u.piece)] = nid
                label = self.nodes[u.node].piece_key(u.piece) + _parts(u, self.nodes[u.node])
                shape = ('{{"', '"}}') if s.loop == u.node else ('["', '"]')
                lines.append(f"    {nid}{shape[0]}{label}<br/>{self.nodes[u.node].kind}{shape[1]}")
            lines.append("  end")
        lines.append("  outputs([outputs])")
        for src, dst, key in self.unit_edges():
            a = "inputs" if src is None else ids[src]
            b = "outputs" if dst is None else ids[dst]
            lines.append(f"  {a} -->|{key}| {b}")
        for lp in self.loops:
            last, first = self.stages[lp.stages[-1]].loop_unit, self.stages[lp.stages[0]].loop_unit
            lines.append(f"  {ids[(last.node, last.piece)]} -.->|next iteration| {ids[(first.node, first.piece)]}")
        return "\n".join(lines)


    def to_dot(self) -> str:
        """Graphviz DOT: a cluster per place (rank and device), a box per stage copy, edges
        labelled with the values they carry; edges between places are transfers (red)."""
        def q(s: str) -> str:
            return '"' + s.replace('"', '\\"') + '"'  # labels keep their line breaks (backslash n)

        places: dict[tuple[int, str], list[str]] = {}
        lines = ["digraph plan {", "  rankdir=LR;", '  node [shape=box, fontsize=10, fontname="Helvetica"];',
                 '  edge [fontsize=8, fontname="Helvetica"];', '  inputs [shape=oval]; outputs [shape=oval];']
        for s in self.stages:
            for r, p in enumerate(s.places):
                copy = f" copy {r}/{len(s.places)}" if len(s.places) > 1 else ""
                label = f"stage {s.index}{copy}\\n" + "\\n".join(self.nodes[u.node].piece_key(u.piece) + _parts(u, self.nodes[u.node]) for u in s.units)
                style = ", style=rounded" if s.loop else ""
                places.setdefault((p.rank, p.device), []).append(f"    s{s.index}_{r} [label={q(label + (' [loop]' if s.loop else ''))}{style}];")
        for (rank, dev), boxes in sorted(places.items()):
            name = f"rank {rank} : {dev}" if self.distributed else dev
            lines += [f"  subgraph cluster_{rank}_{dev.replace(':', '_')} {{", f"    label={q(name)}; style=dashed;", *boxes, "  }"]
        seen: set[tuple[str, str]] = set()
        keys: dict[tuple[str, str], list[str]] = {}
        xfer: set[tuple[str, str]] = set()
        for e in self.edges:
            srcs = ["inputs"] if e.src_stage < 0 else [f"s{e.src_stage}_{r}" for r in range(len(self.stages[e.src_stage].places))]
            dsts = ["outputs"] if e.dst_stage >= self.num_stages else [f"s{e.dst_stage}_{r}" for r in range(len(self.stages[e.dst_stage].places))]
            for a in srcs:
                for b in dsts:
                    same_owner = a != "inputs" and b != "outputs" and self.stages[e.src_stage].owner == self.stages[e.dst_stage].owner
                    if same_owner and a.split("_")[1] != b.split("_")[1]:
                        continue  # the pieces of one copy of a node stay together
                    keys.setdefault((a, b), []).append(e.key)
                    pa = None if a == "inputs" else self.stages[e.src_stage].places[int(a.split("_")[1])]
                    pb = None if b == "outputs" else self.stages[e.dst_stage].places[int(b.split("_")[1])]
                    if pa is not None and pb is not None and (pa.rank, pa.device) != (pb.rank, pb.device):
                        xfer.add((a, b))
        for (a, b), ks in keys.items():
            if (a, b) in seen:
                continue
            seen.add((a, b))
            style = ', color=red, fontcolor=red, penwidth=1.5' if (a, b) in xfer else ""
            label = ", ".join(sorted(set(ks))) + ("\\n(transfer)" if (a, b) in xfer else "")
            lines.append(f"  {a} -> {b} [label={q(label)}{style}];")
        for lp in self.loops:
            for r in range(len(self.stages[lp.stages[0]].places)):
                lines.append(f'  s{lp.stages[-1]}_{r} -> s{lp.stages[0]}_{r} [style=dashed, label="next iteration"];')
        lines.append("}")
        return "\n".join(lines)


def _parts(u: Unit, node: PlanNode) -> str:
    if node.num_parts <= 1:
        return ""
    lo, hi = u.parts
    return f" (parts {lo}-{hi - 1}/{node.num_parts})" if hi - lo > 1 else f" (part {lo}/{node.num_parts})"


def _from_data(tp: Any, data: Any) -> Any:
    """Rebuild dataclasses from ``asdict`` output, following type hints."""
    if data is None:
        return None
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        make: Any = tp
        return make(**{k: _from_data(hints[k], v) for k, v in data.items() if k in hints})
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return [_from_data(arg, v) for v in data]
    if origin is dict:
        args = typing.get_args(tp)
        vt = args[1] if args else Any
        return {k: _from_data(vt, v) for k, v in data.items()}
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        for a in typing.get_args(tp):
            if dataclasses.is_dataclass(a) and isinstance(data, dict):
                return _from_data(a, data)
        return data
    return data
