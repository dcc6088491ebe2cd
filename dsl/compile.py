"""The compiler: a validated recipe -> a ``Plan``, one pass at a time.

Passes 1-4 (graph level) live here; passes 5-8 (stages, devices, transfers,
schedule) in ``dsl/stages.py`` and are re-exported for callers of this module.

resolve kinds -> wire ports -> infer shapes/dtypes -> expand splittable nodes
into pieces -> partition into stages -> place on devices -> insert transfers
-> schedule. Each pass is a plain function with its own tests; all problems
found by all passes are raised together as one ``RecipeError``.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mmpipe.dsl.auto import assign_places, profile_mode
from mmpipe.dsl.auto import prepare as prepare_balance
from mmpipe.dsl.errors import RecipeError, did_you_mean
from mmpipe.dsl.load import Loaded, load_recipe
from mmpipe.dsl.plan import Plan, PlanNode, PortSpec
from mmpipe.dsl.predict import predict
from mmpipe.dsl.schema import NodeSpec, Problems, Recipe, validate
from mmpipe.dsl.shapes import dtype_ok, fmt, substitute, unify
from mmpipe.dsl.stages import (check_with_previous, choose_schedule, device_available, device_of, insert_transfers, loops_of,  # noqa: F401
                               partition_stages, place_devices, single_process, spread_ranks, wire_stages)
from mmpipe.dsl.typecheck import build
from mmpipe.graphs import get_kind, get_source, kind_names, load_target, source_names
from mmpipe.graphs.base import NodeKind, Port

MAX_PARTS = 10_000  # more pieces than any model has layers: parameters gone wrong
_INPUT_DTYPES = {"audio": ("str", None), "text": ("str", None), "image": ("any", None), "tensor": ("any", None), "int": ("int64", ["B"]), "float": ("float32", ["B"])}


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
            try:
                checks = cls.check(cfg)
            except Exception as exc:  # a kind's check may trip over absurd values itself
                checks = [("", f"{cls.kind}.check() failed on these parameters: {type(exc).__name__}: {exc}", "check the node's parameters")]
            for field_, msg, fix in checks:
                problems.add(f"{key}.{field_}" if field_ else key, msg, fix, _get(cfg, field_) if field_ else None, bool(field_))
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
        dtype, dims = _INPUT_DTYPES.get(spec.type, ("any", None))
        shape: list[int | str] | None = list(dims) if dims is not None else None
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
        try:  # a kind's own arithmetic may fail on absurd parameters: a problem, not a crash
            n = int(r.kind.num_parts(r.config))
            costs = [float(c) for c in r.kind.part_costs(r.config)] if 1 <= n <= MAX_PARTS else []
        except Exception as exc:
            problems.add(f"nodes.{name}", f"{r.kind.kind} cannot size its parts with these parameters: {type(exc).__name__}: {exc}",
                         "check the node's parameters (model sizes, layer or block counts)")
            continue
        split = r.spec.split
        key = f"nodes.{name}.split"
        if not 1 <= n <= MAX_PARTS:
            if not any(p.key.startswith(f"nodes.{name}.") for p in problems.items):  # else the kind's own check said why
                problems.add(f"nodes.{name}", f"{r.kind.kind} has {n} parts with these parameters: a node needs 1 to {MAX_PARTS}",
                             "check the node's parameters (e.g. a layer or part count)", n, True)
            continue
        if split > 1 and not r.kind.splittable:
            problems.add(key, f"{r.kind.kind} cannot be split", f"remove split or set {key}=1", split, True)
            split = 1
        elif split > n:
            problems.add(key, f"split {split} is larger than the node's {n} parts", f"set {key} to at most {n}", split, True)
            split = n
        if len(costs) != n or not all(c >= 0 and c < float("inf") for c in costs):
            costs = [1.0] * n
        ins = [PortSpec(p.name, p.dtype, list(p.shape) if p.shape is not None else None, p.collate, p.pad_value, p.optional) for p in r.in_ports]
        outs = [values.get(f"{name}.{p.name}") or PortSpec(p.name, p.dtype, None, p.collate) for p in r.out_ports]
        out[name] = PlanNode(
            name=name, kind=r.kind.kind, target=r.spec.target, config=dataclasses.asdict(r.config), wires=dict(r.spec.wires),
            in_ports=ins, out_ports=outs, num_parts=n, split=split, pieces=balanced_ranges(costs, split), costs=costs,
            loop=r.kind.loop, light=r.kind.is_light(r.config), expands=r.kind.expands, replicas=r.spec.replicas,
            with_previous=bool(r.spec.with_previous),
        )
    return out


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
    try:
        checks = cls.check(cfg)
    except Exception as exc:
        checks = [("", f"{src.kind}.check() failed on these parameters: {type(exc).__name__}: {exc}", "check the source's parameters")]
    for field_, msg, fix in checks:
        problems.add(f"source.{field_}" if field_ else "source", msg, fix, getattr(cfg, field_, None), bool(field_))
    for name, spec in recipe.top.inputs.items():
        if not spec.optional and name not in cls.fields:
            problems.add(f"inputs.{name}", f"source {src.kind} does not provide '{name}'", f"it provides: {', '.join(cls.fields)}")
    return {"kind": src.kind, "params": dataclasses.asdict(cfg)}


def compile_loaded(loaded: Loaded, available: Callable[[str], bool] | None = None, mode: str = "run",
                   microbatches: int | None = None) -> Plan:
    """Run every pass; raise one RecipeError listing every problem found.

    ``mode``: ``run`` (balance when the recipe asks), ``profile`` (one piece per part, one
    process: what ``mmpipe profile`` measures) or ``simulate`` (devices and ranks this
    machine lacks are allowed). ``microbatches``: of a run, for the predicted bubble
    (default: from the source's request count when it has one).
    """
    recipe, problems = validate(loaded)
    if recipe is None:
        problems.raise_if_any()
        raise AssertionError("validate returned no recipe and no problem")
    source = check_source(recipe, problems)
    resolved = resolve_kinds(recipe, problems)
    order = wire_ports(recipe, resolved, problems)
    values = infer_shapes(recipe, resolved, order, problems)
    nodes = expand_parts(resolved, order, values, problems)
    splittable = {n: r.kind.splittable for n, r in resolved.items()}
    check = (lambda d: True) if mode == "simulate" else (available or device_available)
    rt = recipe.top.runtime
    distributed = rt.backend == "distributed" and mode != "profile"
    auto = None
    if mode == "profile":
        placement = profile_mode(recipe, nodes, splittable)
    else:
        auto = prepare_balance(recipe, nodes, order, splittable, problems, check)
        placement = auto.placement if auto else dict(recipe.top.placement)
    place_devices([n.name for n in recipe.nodes], nodes, placement, problems, check, rt.nproc, distributed)
    check_with_previous(nodes, order, problems)
    problems.raise_if_any()
    stages = partition_stages(nodes, order, placement, problems)
    problems.raise_if_any()
    if auto is not None:
        assign_places(auto, stages, distributed, rt.nproc)
    if distributed:
        spread_ranks(stages, rt.nproc, problems)
        problems.raise_if_any()
    else:
        single_process(stages)
    edges, consumers = wire_stages(stages, nodes, recipe.top.outputs, values)
    top = recipe.top
    plan = Plan(
        recipe=top.name, file=str(loaded.path), description=top.description,
        inputs={k: dataclasses.asdict(v) for k, v in top.inputs.items()}, outputs=dict(top.outputs), source=source,
        nodes=nodes, order=order, stages=stages, edges=edges, transfers=insert_transfers(stages, edges, distributed),
        loops=loops_of(stages), consumers=consumers,
        # request parameters micro-batches must not mix (the kinds' batch_keys)
        batching={**dataclasses.asdict(top.batching), "group_by": sorted({k for r in resolved.values() for k in r.kind.batch_keys})},
        runtime=dataclasses.asdict(top.runtime), schedule=choose_schedule(stages),
        trace=os.path.expanduser(top.trace) if top.trace else None,
        output_dir=os.path.expanduser(top.output_dir), seed=top.seed, allow_targets=list(top.allow_targets),
    )
    if auto is not None:
        plan.predicted = predict(plan, auto, microbatches or microbatches_of(plan))
    return plan


def microbatches_of(plan: Plan) -> int | None:
    """Micro-batches of a run of the source's requests, when that is known without reading
    the inputs: a ``count``, or the files a ``path`` (file, directory or glob) names."""
    params = (plan.source or {}).get("params", {})
    count = params.get("count")
    if not isinstance(count, int):
        count = _files_named(params.get("path"))
    size = max(1, int(plan.runtime.get("microbatch_size", 1)))
    return -(-int(count) // size) if isinstance(count, int) and count > 0 else None


def _files_named(path: Any) -> int | None:
    if not isinstance(path, str) or not path:
        return None
    p = Path(os.path.expanduser(path))
    if any(c in path for c in "*?["):
        base = Path(p.anchor) if p.is_absolute() else Path(".")
        return sum(1 for q in base.glob(str(p.relative_to(p.anchor)) if p.is_absolute() else path) if q.is_file())
    if p.is_dir():
        return sum(1 for q in p.iterdir() if q.is_file() and not q.name.startswith("."))
    return 1 if p.is_file() else None


def compile_recipe(recipe: str | Path, overrides: list[str] | None = None, available: Callable[[str], bool] | None = None) -> Plan:
    """Load (Hydra compose) and compile a recipe name or path with overrides."""
    return compile_loaded(load_recipe(recipe, overrides), available)


__all__ = [
    "RecipeError", "Resolved", "resolve_kinds", "wire_ports", "infer_shapes", "expand_parts", "balanced_ranges",
    "partition_stages", "place_devices", "wire_stages", "insert_transfers", "choose_schedule", "compile_loaded",
    "compile_recipe", "device_of",
]
