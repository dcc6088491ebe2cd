"""The typed recipe schema and its validation (every problem in one pass).

A recipe is plain YAML composed by Hydra; this module checks its top level and
returns a typed ``Recipe``. Node parameters are checked later, against each
node kind's ``Config``, by the compiler's resolve pass.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mmpipe.dsl.errors import Problem, RecipeError, did_you_mean
from mmpipe.dsl.load import Loaded, Provenance
from mmpipe.dsl.typecheck import build

INPUT_TYPES = ("audio", "text", "image", "tensor", "int", "float")
BACKENDS = ("threads", "sequential", "distributed")
# auto: NCCL between two GPUs of different ranks, else host memory over gloo; gloo: always host memory
TRANSPORTS = ("auto", "gloo")


@dataclass(kw_only=True)
class InputSpec:
    """A request field."""

    type: str
    optional: bool = False
    doc: str = ""


@dataclass(kw_only=True)
class SourceSpec:
    """Where requests come from: a source kind and its parameters."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class NodeSpec:
    """One node of the recipe graph, before kind-specific checks."""

    name: str
    kind: str | None
    target: str | None
    wires: dict[str, str]
    split: int
    params: dict[str, Any]
    replicas: int = 1
    # ``split: auto`` / ``replicas: auto``: the balancer chooses (``dsl/balance.py``)
    split_auto: bool = False
    replicas_auto: bool = False
    # a loop node's first body stage also runs the last piece of the heavy node before it
    # (``dsl/stages.py``); None: not set (the balancer may choose it)
    with_previous: bool | None = None


@dataclass(kw_only=True)
class Batching:
    max_batch_size: int = 8
    max_delay_ms: float = 5.0
    length_buckets: list[float] = field(default_factory=list)


@dataclass(kw_only=True)
class RuntimeOptions:
    backend: str = "threads"
    microbatch_size: int = 4
    queue_depth: int = 4
    timeout_s: float = 600.0
    # Micro-batches allowed inside a loop at once (0: one per loop stage, min 2).
    max_inflight: int = 0
    dtype: str = "float32"
    # Intra-op threads of each stage worker (0: the process's, i.e. OMP_NUM_THREADS or
    # the cores; distributed: the rank's). Stages busy at the same time each use them,
    # so k busy stages on C cores want about C / k.
    threads_per_stage: int = 0
    # runtime=distributed: processes (ranks) in all, intra-op threads per rank
    # (0: this host's cores divided by its local ranks), how long a silent peer
    # counts as alive, and how tensors travel between ranks.
    nproc: int = 1
    threads_per_rank: int = 0
    peer_timeout_s: float = 30.0
    transport: str = "auto"


@dataclass(kw_only=True)
class BalanceOptions:
    """What the balancer may use (``split: auto``, ``replicas: auto``, ``placement: auto``) and
    the machine ``mmpipe plan --simulate`` assumes."""

    # Most stage copies (workers) in all; 0: one per place (rank, or device of ``devices``),
    # or, on one CPU, as many as the cores allow (twice cores / intra-op threads).
    stages: int = 0
    # placement: auto in one process: the devices to place stages on (default: cpu).
    devices: list[str] = field(default_factory=list)
    memory_gb: float = 0.0  # per device (a CPU host: for all its stages); 0: the profiled machine's
    hosts: int = 1  # distributed: the ranks are spread over this many hosts (simulation)
    cores: int = 0  # cores per host; 0: the profiled machine's
    bandwidth_gbs: float = 1.25  # GB/s of a link between hosts (10 Gbit/s Ethernet)
    local_bandwidth_gbs: float = 4.0  # GB/s between processes or devices of one host
    latency_ms: float = 0.2  # per message between processes
    # busy threads of other processes on each host (the simulator); -1: what the profile saw
    background: float = -1.0
    # the OS's time slice when more compute-bound threads than cores want to run (the
    # simulator); 0: Linux's default for the host's cores (0.75 ms x (1 + log2 cores, cores <= 8))
    time_slice_ms: float = 0.0


@dataclass(kw_only=True)
class Top:
    """The top-level keys every recipe may set (node and source bodies checked separately)."""

    name: str
    description: str = ""
    inputs: dict[str, InputSpec] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] | None = None
    placement: dict[str, str | list[str]] = field(default_factory=dict)
    batching: Batching = field(default_factory=Batching)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    trace: str | None = None
    # A measured profile (``mmpipe profile``): the balancer's and the simulator's costs.
    profile: str | None = None
    balance: BalanceOptions = field(default_factory=BalanceOptions)
    output_dir: str = "outputs"
    seed: int = 0
    allow_targets: list[str] = field(default_factory=list)
    # An output_dir that holds an earlier run's results: skip the requests that
    # succeeded there (resume) or start afresh (overwrite). Neither: a user error.
    resume: bool = False
    overwrite: bool = False


@dataclass
class Recipe:
    """A validated recipe: typed top level plus nodes in file order."""

    top: Top
    nodes: list[NodeSpec]
    source: SourceSpec | None
    variables: dict[str, Any]
    file: str
    config: dict[str, Any]


class Problems:
    """Collects problems, locating each through the provenance map."""

    def __init__(self, provenance: Provenance) -> None:
        self.provenance = provenance
        self.items: list[Problem] = []

    def add(self, key: str, message: str, fix: str = "", value: Any = None, has_value: bool = False) -> None:
        self.items.append(Problem(key, message, fix, self.provenance.where(key), value, has_value))

    def __call__(self, key: str, message: str, fix: str, value: Any, has_value: bool) -> None:
        self.add(key, message, fix, value, has_value)

    def raise_if_any(self) -> None:
        if self.items:
            raise RecipeError(self.items)


def resolve_config(cfg: Any, problems: Problems) -> dict[str, Any]:
    """The composed config as plain data; each broken interpolation is one problem."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, DictConfig):
            out: dict[Any, Any] = {}
            k: Any
            for k in node.keys():
                p = f"{path}.{k}" if path else str(k)
                if OmegaConf.is_missing(node, k):
                    out[k] = "???"
                    continue
                raw: Any = node._get_node(k)
                try:
                    child = raw._dereference_node() if OmegaConf.is_interpolation(node, k) else raw
                except OmegaConfBaseException as exc:
                    problems.add(p, f"cannot resolve {raw._value()!r}: {str(exc).splitlines()[0]}", "fix the ${...} reference (keys are case-sensitive)")
                    out[k] = None
                    continue
                out[k] = walk(child, p)
            return out
        if isinstance(node, ListConfig):
            return [walk(node._get_node(i), f"{path}[{i}]") for i in range(len(node))]
        if hasattr(node, "_value"):
            if OmegaConf.is_config(node):
                return walk(node, path)
            v = node._value()
            if isinstance(v, str) and "${" in v:
                try:
                    return node._dereference_node()._value()
                except OmegaConfBaseException as exc:
                    problems.add(path, f"cannot resolve {v!r}: {str(exc).splitlines()[0]}", "fix the ${...} reference")
                    return None
            return v
        return node

    data: dict[str, Any] = walk(cfg, "")
    return data


_REF = re.compile(r"\$\{([^}]+)\}")


def referenced_top_keys(cfg: Any) -> set[str]:
    """Top-level keys used by some ``${...}`` interpolation (recipe variables)."""
    from omegaconf import OmegaConf

    # the unresolved strings, keys included, from plain data (to_yaml, used before, deep-copied
    # and serialized the whole config: 40% of a compile)
    strings: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, str):
            strings.append(x)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(OmegaConf.to_container(cfg, resolve=False))
    out = set()
    for m in _REF.finditer("\n".join(strings)):
        ref = m.group(1).strip()
        if ":" in ref.split(".")[0]:
            continue  # a resolver call
        out.add(re.split(r"[.\[]", ref.lstrip("."), maxsplit=1)[0])
    return out


def validate(loaded: Loaded) -> tuple[Recipe | None, Problems]:
    """Check the top level of a composed recipe. Problems are returned, not raised."""
    problems = Problems(loaded.provenance)
    data = resolve_config(loaded.cfg, problems)
    known = {f for f in Top.__dataclass_fields__}
    refs = referenced_top_keys(loaded.cfg)
    top_data, variables = {}, {}
    for k, v in data.items():
        if k in known:
            top_data[k] = v
        elif k in refs or k in loaded.choices:
            variables[k] = v
        else:
            hint = did_you_mean(k, known)
            problems.add(k, f"unknown key '{k}'", hint or f"top-level keys are {', '.join(sorted(known))}; a recipe variable must be used by some ${{{k}}}")
    if top_data.get("placement") == "auto":  # ``placement: auto`` written as a value
        top_data["placement"] = {"default": "auto"}
    if isinstance(top_data.get("placement"), dict):
        top_data["placement"] = _flatten(top_data["placement"])
    if "name" not in top_data:
        top_data["name"] = loaded.path.stem
    top = build(Top, top_data, "", problems, lenient=True)  # bad values take defaults: later checks still run
    if top is None:
        return None, problems
    _check_top(top, problems)
    nodes = _nodes(top, problems)
    source = _source(top, problems)
    return Recipe(top=top, nodes=nodes, source=source, variables=variables, file=problems.provenance.recipe_file, config=data), problems


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{decoder: {1: cuda:1}}`` (what ``+placement.decoder.1=cuda:1`` makes) -> ``{decoder.1: cuda:1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _check_top(top: Top, problems: Problems) -> None:
    for name, spec in top.inputs.items():
        if spec.type not in INPUT_TYPES:
            problems.add(f"inputs.{name}.type", f"unknown input type '{spec.type}'", did_you_mean(spec.type, INPUT_TYPES) or f"use one of {', '.join(INPUT_TYPES)}", spec.type, True)
    b, r = top.batching, top.runtime
    for key, v in (("batching.max_batch_size", b.max_batch_size), ("runtime.microbatch_size", r.microbatch_size), ("runtime.queue_depth", r.queue_depth)):
        if v <= 0:
            problems.add(key, f"must be positive, got {v}", f"set {key}=1 or more", v, True)
    for key, x in (("batching.max_delay_ms", b.max_delay_ms), ("runtime.max_inflight", float(r.max_inflight))):
        if x < 0:
            problems.add(key, f"must not be negative, got {x:g}", f"set {key}=0 or more", x, True)
    if r.timeout_s <= 0:
        problems.add("runtime.timeout_s", f"must be positive, got {r.timeout_s}", "e.g. runtime.timeout_s=600", r.timeout_s, True)
    if b.max_batch_size > 0 and r.microbatch_size > b.max_batch_size:
        problems.add("runtime.microbatch_size", f"micro-batch size {r.microbatch_size} is larger than batching.max_batch_size {b.max_batch_size}", f"set runtime.microbatch_size={b.max_batch_size} or raise batching.max_batch_size", r.microbatch_size, True)
    if r.backend not in BACKENDS:
        problems.add("runtime.backend", f"unknown backend '{r.backend}'", did_you_mean(r.backend, BACKENDS) or f"use one of {', '.join(BACKENDS)}", r.backend, True)
    if r.nproc <= 0:
        problems.add("runtime.nproc", f"must be positive, got {r.nproc}", "e.g. runtime.nproc=2", r.nproc, True)
    elif r.nproc > 1 and r.backend != "distributed":
        problems.add("runtime.nproc", f"runtime.nproc={r.nproc} needs the distributed backend", "add runtime=distributed (or set runtime.nproc=1)", r.nproc, True)
    if r.threads_per_stage < 0:
        problems.add("runtime.threads_per_stage", f"must not be negative, got {r.threads_per_stage}", "0 keeps the process's intra-op threads", r.threads_per_stage, True)
    if r.threads_per_rank < 0:
        problems.add("runtime.threads_per_rank", f"must not be negative, got {r.threads_per_rank}", "0 picks cores / local ranks", r.threads_per_rank, True)
    if r.peer_timeout_s <= 0:
        problems.add("runtime.peer_timeout_s", f"must be positive, got {r.peer_timeout_s}", "e.g. runtime.peer_timeout_s=30", r.peer_timeout_s, True)
    if r.transport not in TRANSPORTS:
        problems.add("runtime.transport", f"unknown transport '{r.transport}'", did_you_mean(r.transport, TRANSPORTS) or f"use one of {', '.join(TRANSPORTS)}", r.transport, True)
    if r.dtype not in ("float32", "float16", "bfloat16"):
        problems.add("runtime.dtype", f"unknown dtype '{r.dtype}'", "use float32, float16 or bfloat16", r.dtype, True)
    if not top.nodes:
        problems.add("nodes", "the recipe has no nodes", "add at least one node under nodes:")
    bal = top.balance
    limits: tuple[tuple[str, float], ...] = (("balance.stages", bal.stages), ("balance.memory_gb", bal.memory_gb),
                                             ("balance.cores", bal.cores), ("balance.latency_ms", bal.latency_ms),
                                             ("balance.time_slice_ms", bal.time_slice_ms))
    for key, lim in limits:
        if lim < 0:
            problems.add(key, f"must not be negative, got {lim}", f"set {key}=0 (0: automatic)", lim, True)
    links: tuple[tuple[str, float], ...] = (("balance.hosts", bal.hosts), ("balance.bandwidth_gbs", bal.bandwidth_gbs),
                                            ("balance.local_bandwidth_gbs", bal.local_bandwidth_gbs))
    for key, link in links:
        if link <= 0:
            problems.add(key, f"must be positive, got {link}", f"e.g. {key}=1", link, True)
    if top.resume and top.overwrite:
        problems.add("overwrite", "resume=true and overwrite=true contradict each other", "keep one of them", True, True)


def _nodes(top: Top, problems: Problems) -> list[NodeSpec]:
    out = []
    for name, body in top.nodes.items():
        key = f"nodes.{name}"
        if not isinstance(body, dict):
            problems.add(key, f"a node must be a mapping, got {type(body).__name__}", "write kind: ..., in: {...}", body, True)
            continue
        body = dict(body)
        kind, target = body.pop("kind", None), body.pop("_target_", None)
        wires = body.pop("in", {}) or {}
        split = body.pop("split", 1)
        replicas = body.pop("replicas", 1)
        with_previous = body.pop("with_previous", None)
        split_auto, replicas_auto = split == "auto", replicas == "auto"
        split, replicas = (1 if split_auto else split), (1 if replicas_auto else replicas)
        if kind is not None and not isinstance(kind, str):
            problems.add(f"{key}.kind", f"kind must be a name like family.kind, got {type(kind).__name__}", "e.g. kind: whisper.encoder", kind, True)
            continue
        if target is not None and not isinstance(target, str):
            problems.add(f"{key}._target_", f"_target_ must be a dotted class path, got {type(target).__name__}", "e.g. _target_: mypkg.kinds.MyKind", target, True)
            continue
        if kind is None and target is None:
            problems.add(key, "node has no kind", "add 'kind: family.name' (see `mmpipe ls --kinds`)")
        if not isinstance(wires, dict):
            problems.add(f"{key}.in", "in: must map input ports to 'node.port' or 'inputs.field'", "e.g. in: {features: mel.features}", wires, True)
            wires = {}
        if isinstance(split, bool) or not isinstance(split, int):
            problems.add(f"{key}.split", f"split must be an integer or auto, got {split!r}", f"e.g. {key}.split=2 or {key}.split=auto", split, True)
            split = 1
        elif split <= 0:
            problems.add(f"{key}.split", f"split must be positive, got {split}", f"set {key}.split=1 or more", split, True)
            split = 1
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas <= 0:
            problems.add(f"{key}.replicas", f"replicas must be a positive integer or auto, got {replicas!r}", f"e.g. {key}.replicas=2", replicas, True)
            replicas = 1
        if with_previous is not None and not isinstance(with_previous, bool):
            problems.add(f"{key}.with_previous", f"with_previous must be true or false, got {with_previous!r}", f"e.g. {key}.with_previous=true", with_previous, True)
            with_previous = None
        out.append(NodeSpec(name=name, kind=kind, target=target, wires={str(k): str(v) for k, v in wires.items()}, split=split, params=body,
                            replicas=replicas, split_auto=split_auto, replicas_auto=replicas_auto, with_previous=with_previous))
    return out


def _source(top: Top, problems: Problems) -> SourceSpec | None:
    if top.source is None:
        return None
    body = dict(top.source)
    kind = body.pop("kind", None)
    if not kind:
        problems.add("source.kind", "the source has no kind", "e.g. source: {kind: audio.files, path: ${input}}")
        return None
    return SourceSpec(kind=str(kind), params=body)
