"""The compiler: a validated recipe -> a ``Plan``, one pass at a time.

resolve kinds -> wire ports -> infer shapes/dtypes -> expand splittable nodes
into pieces -> partition into stages -> place on devices -> insert transfers
-> schedule. Each pass is a plain function with its own tests; all problems
found by all passes are raised together as one ``RecipeError``.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mmpipe.dsl.errors import RecipeError, did_you_mean
from mmpipe.dsl.load import Loaded, load_recipe
from mmpipe.dsl.plan import INPUT_STAGE, Edge, LoopPlan, Plan, PlanNode, PortSpec, Stage, Transfer, Unit
from mmpipe.dsl.schema import NodeSpec, Problems, Recipe, validate
from mmpipe.dsl.shapes import dtype_ok, fmt, substitute, unify
from mmpipe.dsl.typecheck import build
from mmpipe.graphs import get_kind, get_source, kind_names, load_target, source_names
from mmpipe.graphs.base import NodeKind, Port

_INPUT_DTYPES = {"audio": ("str", None), "text": ("str", None), "image": ("any", None), "tensor": ("any", None), "int": ("int64", ["B"]), "float": ("float32", ["B"])}
_DEVICE = re.compile(r"^(cpu|meta|mps|cuda|xpu)(:\d+)?$")


@dataclass
class Resolved:
    """A node with its kind class, typed config and ports."""

    spec: NodeSpec
    kind: type[NodeKind]
    config: Any
    in_ports: tuple[Port, ...]
    out_ports: tuple[Port, ...]


# ------------------------------------------------------------------ pass 1
def resolve_kinds(recipe: Recipe, problems: Problems) -> dict[str, Resolved]:
    """Find each node's kind (registry or allowed ``_target_``) and type its config."""
    out: dict[str, Resolved] = {}
    for spec in recipe.nodes:
        key = f"nodes.{spec.name}"
        cls = _kind_class(spec, recipe.top.allow_targets, key, problems)
        if cls is None:
            continue
        cfg = build(cls.Config, spec.params, key, problems)
        if cfg is None:
            # Keep checking wires and splits with the kind's defaults; the
            # config problems themselves are already reported.
            cfg = _defaults(cls, spec.params)
            if cfg is None:
                continue
        else:
            for field_, msg, fix in cls.check(cfg):
                problems.add(f"{key}.{field_}", msg, fix, _get(cfg, field_), True)
        try:
            ins, outs = cls.ports(cfg)
        except Exception as exc:  # a user kind's ports() may fail on odd configs
            problems.add(key, f"{cls.kind}.ports() failed: {exc}", "check the node's parameters")
            continue
        out[spec.name] = Resolved(spec, cls, cfg, ins, outs)
    return out


def _defaults(cls: type[NodeKind], params: dict[str, Any]) -> Any:
    """The kind's config from the params that type-check, defaults for the rest."""
    good = {}
    for k, v in params.items():
        trial: list[Any] = []
        if k in {f.name for f in dataclasses.fields(cls.Config)} and build(cls.Config, {k: v}, "", lambda *r: trial.append(r)) is not None:
            good[k] = v
    try:
        return build(cls.Config, good, "", lambda *r: None)
    except Exception:
        return None


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def _kind_class(spec: NodeSpec, allow: list[str], key: str, problems: Problems) -> type[NodeKind] | None:
    if spec.target:
        if not any(spec.target == a or spec.target.startswith(a.rstrip(".") + ".") for a in allow):
            problems.add(f"{key}._target_", f"'{spec.target}' is not in the recipe's allow_targets", f"add its module prefix to allow_targets (e.g. allow_targets: [{spec.target.rsplit('.', 1)[0]}]) if you trust that code", spec.target, True)
            return None
        try:
            return load_target(spec.target)
        except Exception as exc:  # user code: report, do not crash
            problems.add(f"{key}._target_", f"cannot load '{spec.target}': {exc}", "check the module path and that the class subclasses mmpipe.graphs.NodeKind", spec.target, True)
            return None
    try:
        cls = get_kind(spec.kind or "")
    except ImportError as exc:
        problems.add(f"{key}.kind", f"kind '{spec.kind}' cannot be loaded: {exc}", "install the missing package", spec.kind, True)
        return None
    if cls is None:
        hint = did_you_mean(spec.kind or "", kind_names())
        problems.add(f"{key}.kind", f"unknown kind '{spec.kind}'", hint or f"known kinds: {', '.join(kind_names())}", spec.kind, True)
    return cls


# ------------------------------------------------------------------ pass 2
def wire_ports(recipe: Recipe, resolved: dict[str, Resolved], problems: Problems) -> list[str]:
    """Check every ``in:`` wire and recipe output; return a topological node order.

    A cycle is an error: loops live inside loop nodes, never in the graph.
    """
    names = [n.name for n in recipe.nodes]
    deps: dict[str, set[str]] = {n: set() for n in names}
    for name, r in resolved.items():
        key = f"nodes.{name}.in"
        ports = {p.name: p for p in r.in_ports}
        for port, src in r.spec.wires.items():
            if port not in ports:
                problems.add(f"{key}.{port}", f"{r.kind.kind} has no input port '{port}'", did_you_mean(port, ports) or f"its inputs are: {', '.join(ports) or 'none'}", port, True)
                continue
            dep = _check_source(src, f"{key}.{port}", recipe, resolved, problems)
            if dep == name:
                problems.add(f"{key}.{port}", f"node '{name}' reads its own output", "loops belong inside a loop node (e.g. whisper.decode), not in the graph", src, True)
            elif dep:
                deps[name].add(dep)
        for p in r.in_ports:
            if not p.optional and p.name not in r.spec.wires:
                problems.add(key, f"required input port '{p.name}' of {r.kind.kind} is not wired", f"add in: {{{p.name}: <node>.<port> or inputs.<field>}}")
    for out_name, src in recipe.top.outputs.items():
        _check_source(src, f"outputs.{out_name}", recipe, resolved, problems)
    order, cycle = _toposort(names, deps)
    if cycle:
        problems.add(f"nodes.{cycle[0]}.in", f"cycle between nodes: {' -> '.join(cycle + [cycle[0]])}", "a graph must be acyclic; put repeated work in a loop node (kind with a loop body)")
    return order


def _check_source(src: str, key: str, recipe: Recipe, resolved: dict[str, Resolved], problems: Problems) -> str | None:
    if "." not in src:
        problems.add(key, f"'{src}' is not a wire", "write 'node.port' or 'inputs.field'", src, True)
        return None
    head, port = src.split(".", 1)
    if head == "inputs":
        if port not in recipe.top.inputs:
            problems.add(key, f"no request input '{port}'", did_you_mean(port, recipe.top.inputs) or f"declare it under inputs: (have: {', '.join(recipe.top.inputs) or 'none'})", src, True)
        return None
    if head not in {n.name for n in recipe.nodes}:
        problems.add(key, f"no node '{head}'", did_you_mean(head, [n.name for n in recipe.nodes] + ["inputs"]) or "wire from an existing node or inputs.<field>", src, True)
        return None
    r = resolved.get(head)
    if r is None:
        return head  # its own problem was reported already
    outs = [p.name for p in r.out_ports]
    if port not in outs:
        problems.add(key, f"node '{head}' ({r.kind.kind}) has no output port '{port}'", did_you_mean(port, outs) or f"its outputs are: {', '.join(outs)}", src, True)
    return head


def _toposort(names: list[str], deps: dict[str, set[str]]) -> tuple[list[str], list[str]]:
    order: list[str] = []
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(n: str, stack: list[str]) -> None:
        nonlocal cycle
        if state.get(n) == 2 or cycle:
            return
        if state.get(n) == 1:
            cycle = stack[stack.index(n):]
            return
        state[n] = 1
        for d in sorted(deps[n], key=names.index):
            visit(d, stack + [d])
        state[n] = 2
        order.append(n)

    for n in names:
        visit(n, [n])
    return order, cycle


# ------------------------------------------------------------------ pass 3
def infer_shapes(recipe: Recipe, resolved: dict[str, Resolved], order: list[str], problems: Problems) -> dict[str, PortSpec]:
    """Check dtype and symbolic shape on every edge; return the spec of every value key."""
    values: dict[str, PortSpec] = {}
    for name, spec in recipe.top.inputs.items():
        dtype, shape = _INPUT_DTYPES.get(spec.type, ("any", None))
        values[f"inputs.{name}"] = PortSpec(name, dtype, shape, "list" if shape is None else "stack", optional=spec.optional)
    for name in order:
        r = resolved.get(name)
        if r is None:
            continue
        binding: dict[str, Any] = {}
        ports = {p.name: p for p in r.in_ports}
        for port, src in r.spec.wires.items():
            exp, act = ports.get(port), values.get(src)
            if exp is None or act is None:
                continue
            key = f"nodes.{name}.in.{port}"
            if not dtype_ok(exp.dtype, act.dtype):
                problems.add(key, f"dtype mismatch: {src} is {act.dtype}, {r.kind.kind}.{port} needs {exp.dtype}", "wire a port of the right dtype, or add a conversion node", src, True)
            if exp.shape is None or act.shape is None:
                continue
            msg = unify(list(exp.shape), list(act.shape), binding)
            if msg:
                problems.add(key, f"shape mismatch on {src} -> {name}.{port}: {msg}", f"{src} is {fmt(act.shape)}; {name}.{port} needs {fmt(list(exp.shape))}: check the model group or the node's parameters", src, True)
        for p in r.out_ports:
            values[f"{name}.{p.name}"] = PortSpec(p.name, p.dtype, substitute(list(p.shape) if p.shape is not None else None, binding), p.collate, p.pad_value, p.optional)
    return values


# ------------------------------------------------------------------ pass 4
def balanced_ranges(costs: list[float], groups: int) -> list[list[int]]:
    """Cut ``costs`` into ``groups`` contiguous non-empty ranges minimising the largest sum."""
    n = len(costs)
    if not 1 <= groups <= n:
        raise ValueError(f"cannot cut {n} parts into {groups} groups")
    pre = [0.0]
    for c in costs:
        pre.append(pre[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(groups + 1)]
    cut = [[0] * (n + 1) for _ in range(groups + 1)]
    best[0][0] = 0.0
    for g in range(1, groups + 1):
        for i in range(g, n + 1):
            for j in range(g - 1, i):
                v = max(best[g - 1][j], pre[i] - pre[j])
                if v < best[g][i] - 1e-12:
                    best[g][i], cut[g][i] = v, j
    bounds, i = [], n
    for g in range(groups, 0, -1):
        j = cut[g][i]
        bounds.append([j, i])
        i = j
    return bounds[::-1]


def expand_parts(resolved: dict[str, Resolved], order: list[str], values: dict[str, PortSpec], problems: Problems) -> dict[str, PlanNode]:
    """Cut each splittable node into ``split`` contiguous pieces balanced by cost hints."""
    out: dict[str, PlanNode] = {}
    for name in order:
        r = resolved.get(name)
        if r is None:
            continue
        n = int(r.kind.num_parts(r.config))
        split = r.spec.split
        key = f"nodes.{name}.split"
        if split > 1 and not r.kind.splittable:
            problems.add(key, f"{r.kind.kind} cannot be split", f"remove split or set {key}=1", split, True)
            split = 1
        elif split > n:
            problems.add(key, f"split {split} is larger than the node's {n} parts", f"set {key} to at most {n}", split, True)
            split = n
        costs = [float(c) for c in r.kind.part_costs(r.config)]
        if len(costs) != n:
            costs = [1.0] * n
        ins = [PortSpec(p.name, p.dtype, list(p.shape) if p.shape is not None else None, p.collate, p.pad_value, p.optional) for p in r.in_ports]
        outs = [values.get(f"{name}.{p.name}") or PortSpec(p.name, p.dtype, None, p.collate) for p in r.out_ports]
        out[name] = PlanNode(
            name=name, kind=r.kind.kind, target=r.spec.target, config=dataclasses.asdict(r.config), wires=dict(r.spec.wires),
            in_ports=ins, out_ports=outs, num_parts=n, split=split, pieces=balanced_ranges(costs, split), costs=costs,
            loop=r.kind.loop, light=r.kind.light, expands=r.kind.expands,
        )
    return out


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


# ------------------------------------------------------------------ driver
def check_source(recipe: Recipe, problems: Problems) -> dict[str, Any] | None:
    """Type the request source's parameters; check it fills every required input."""
    src = recipe.source
    if src is None:
        return None
    cls = get_source(src.kind)
    if cls is None:
        problems.add("source.kind", f"unknown source kind '{src.kind}'", did_you_mean(src.kind, source_names()) or f"known sources: {', '.join(source_names())}", src.kind, True)
        return None
    cfg = build(cls.Config, src.params, "source", problems)
    if cfg is None:
        return None
    for field_, msg, fix in cls.check(cfg):
        problems.add(f"source.{field_}", msg, fix, getattr(cfg, field_, None), True)
    for name, spec in recipe.top.inputs.items():
        if not spec.optional and name not in cls.fields:
            problems.add(f"inputs.{name}", f"source {src.kind} does not provide '{name}'", f"it provides: {', '.join(cls.fields)}")
    return {"kind": src.kind, "params": dataclasses.asdict(cfg)}


def compile_loaded(loaded: Loaded, available: Callable[[str], bool] | None = None) -> Plan:
    """Run every pass; raise one RecipeError listing every problem found."""
    recipe, problems = validate(loaded)
    if recipe is None:
        problems.raise_if_any()
        raise AssertionError("validate returned no recipe and no problem")
    source = check_source(recipe, problems)
    resolved = resolve_kinds(recipe, problems)
    order = wire_ports(recipe, resolved, problems)
    values = infer_shapes(recipe, resolved, order, problems)
    nodes = expand_parts(resolved, order, values, problems)
    placement = dict(recipe.top.placement)
    place_devices([n.name for n in recipe.nodes], nodes, placement, problems, available)
    problems.raise_if_any()
    stages = partition_stages(nodes, order, placement)
    edges, consumers = wire_stages(stages, nodes, recipe.top.outputs, values)
    top = recipe.top
    return Plan(
        recipe=top.name, file=str(loaded.path), description=top.description,
        inputs={k: dataclasses.asdict(v) for k, v in top.inputs.items()}, outputs=dict(top.outputs), source=source,
        nodes=nodes, order=order, stages=stages, edges=edges, transfers=insert_transfers(stages, edges),
        loops=loops_of(stages), consumers=consumers, batching=dataclasses.asdict(top.batching),
        runtime=dataclasses.asdict(top.runtime), schedule=choose_schedule(stages), trace=top.trace,
        output_dir=top.output_dir, seed=top.seed, allow_targets=list(top.allow_targets),
    )


def compile_recipe(recipe: str | Path, overrides: list[str] | None = None, available: Callable[[str], bool] | None = None) -> Plan:
    """Load (Hydra compose) and compile a recipe name or path with overrides."""
    return compile_loaded(load_recipe(recipe, overrides), available)


__all__ = [
    "RecipeError", "Resolved", "resolve_kinds", "wire_ports", "infer_shapes", "expand_parts", "balanced_ranges",
    "partition_stages", "place_devices", "wire_stages", "insert_transfers", "choose_schedule", "compile_loaded",
    "compile_recipe", "device_of",
]
