"""What the balancer and the simulator know about costs: a measured profile, or cost hints.

A *profile* (``mmpipe profile RECIPE``, saved as ``profile.json``) holds, for every
part of every node, the wall time and CPU time per warm micro-batch (per iteration
for loop parts), its memory and the bytes it hands to the next part; for loops the
trip counts. It is keyed by recipe, models, device type, dtype, micro-batch size
and intra-op threads, and a recipe that points at one (``profile=path``) gets a
problem for every way it does not match.

Without a profile the kinds' cost hints are used: relative within one node, so
every heavy node counts 1.0 in all and nothing is in seconds.

Plain data and JSON: no torch here (``mmpipe plan`` stays fast).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpipe.dsl.plan import PlanNode

PROFILE_VERSION = 1
KEY_FIELDS = ("recipe", "models", "device", "dtype", "microbatch_size", "threads")


@dataclass
class PartCost:
    """One part of a node, per warm micro-batch (loop parts: per iteration)."""

    time_s: float
    cpu_s: float = 0.0  # CPU seconds over all threads (how many cores the part keeps busy)
    param_bytes: int = 0
    act_bytes: int = 0  # peak activations: measured on CUDA, estimated (inputs + outputs) on CPU
    out_bytes: int = 0  # what it hands to the next part (or the node's outputs, last part)
    lane_bytes: int = 0  # loops: state it holds per item in flight (KV caches)
    # loops: seconds an iteration takes per item more than the profile's mean group
    # (``NodeCost.group_items``), fitted over the group sizes it saw; 0: flat in the batch
    item_s: float = 0.0
    # how much slower it ran while every other core ran the same recipe (``mmpipe profile
    # --co-run``): memory-bound parts slow each other down; 1.0: not measured
    corun: float = 1.0

    @property
    def memory_bytes(self) -> int:
        return self.param_bytes + self.act_bytes


@dataclass
class NodeCost:
    """The measured (or hinted) costs of one node's parts."""

    kind: str
    num_parts: int
    parts: list[PartCost]
    loop: bool = False
    light: bool = False
    digest: str = ""  # of the node's config: a changed config makes the profile stale
    items_per_mb: float = 1.0  # items in a micro-batch once expanded (windows of a recording)
    in_bytes: int = 0  # the node's inputs per micro-batch
    # loops: iterations per item, and iterations one micro-batch's group ran (its slowest item)
    trips_per_item: float = 0.0
    iterations_per_mb: float = 0.0
    enter_s: float = 0.0  # loops: entering a micro-batch (begin + enter on every piece)
    trip_counts: list[int] = field(default_factory=list)  # loops: iterations of every profiled item
    group_items: float = 0.0  # loops: mean items per profiled iteration (where ``time_s`` holds)

    def time(self, lo: int, hi: int) -> float:
        """Seconds per micro-batch of parts [lo, hi) (loops: all iterations)."""
        per = sum(p.time_s for p in self.parts[lo:hi])
        return per * self.iterations_per_mb if self.loop else per

    def corun_time(self, lo: int, hi: int) -> float:
        """As ``time``, with every other core running the same recipe (``PartCost.corun``)."""
        per = sum(p.time_s * p.corun for p in self.parts[lo:hi])
        return per * self.iterations_per_mb if self.loop else per

    def cpu(self, lo: int, hi: int) -> float:
        per = sum(p.cpu_s for p in self.parts[lo:hi])
        return per * self.iterations_per_mb if self.loop else per

    def memory(self, lo: int, hi: int) -> int:
        return sum(p.param_bytes for p in self.parts[lo:hi]) + max((p.act_bytes for p in self.parts[lo:hi]), default=0)


@dataclass
class ProfileKey:
    """What a profile was measured for; a recipe must match it to use it."""

    recipe: str
    models: dict[str, str]
    device: str  # device type: cpu, cuda
    dtype: str
    microbatch_size: int
    threads: int  # intra-op threads per stage process (CPU)


@dataclass
class Profile:
    """A measured profile (see the module docstring)."""

    key: ProfileKey
    nodes: dict[str, NodeCost]
    microbatches: int = 0  # warm micro-batches timed
    memory_method: str = ""
    host: dict[str, Any] = field(default_factory=dict)  # cores, memory, device name, load average
    version: int = PROFILE_VERSION
    measured: bool = True  # False: cost hints

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Profile":
        nodes = {k: NodeCost(**{**v, "parts": [PartCost(**p) for p in v["parts"]]}) for k, v in d["nodes"].items()}
        return cls(key=ProfileKey(**d["key"]), nodes=nodes, microbatches=int(d.get("microbatches", 0)),
                   memory_method=str(d.get("memory_method", "")), host=dict(d.get("host", {})),
                   version=int(d.get("version", PROFILE_VERSION)), measured=bool(d.get("measured", True)))

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json())
        return p

    @property
    def cores(self) -> int:
        return int(self.host.get("cores") or os.cpu_count() or 1)


def set_corun(alone: Profile, beside: Profile) -> None:
    """Each part's ``corun`` in ``alone``: its time in ``beside`` (the same parts, timed while
    every other core ran the recipe) over its time alone, both turned into the time of a
    thread with a core of its own (``cpu_share``); at least 1.0 (faster beside: chance)."""
    sa, sb = (float(p.host.get("cpu_share", 1.0)) or 1.0 for p in (alone, beside))
    for name, nc in alone.nodes.items():
        other = beside.nodes.get(name)
        for k, part in enumerate(nc.parts):
            if other is not None and k < len(other.parts) and part.time_s > 0:
                part.corun = round(max(1.0, (other.parts[k].time_s * min(1.0, sb)) / (part.time_s * min(1.0, sa))), 4)


def config_digest(node: PlanNode) -> str:
    """A short hash of a node's kind and parameters (split and replicas are not parameters)."""
    text = json.dumps({"kind": node.kind, "target": node.target, "config": node.config}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def model_of(node: PlanNode) -> str | None:
    """The model a node loads (name and path), if it has a ``model`` parameter."""
    m = node.config.get("model")
    if isinstance(m, dict):
        return f"{m.get('name', '')}@{m.get('path', '')}"
    return str(m) if isinstance(m, str) else None


def configured_threads(runtime: dict[str, Any], cores: int | None = None) -> int | None:
    """The intra-op threads the runtime sets for a stage itself: ``runtime.threads_per_stage``
    when set, else ``runtime.threads_per_rank`` (or cores / local ranks) when distributed;
    None when stages keep the process's count."""
    per_stage = int(runtime.get("threads_per_stage", 0))
    if per_stage > 0:
        return per_stage
    if runtime.get("backend") == "distributed":
        tpr = int(runtime.get("threads_per_rank", 0))
        return tpr if tpr > 0 else max(1, (cores or os.cpu_count() or 1) // max(1, int(runtime.get("nproc", 1))))
    return None


def intra_op_threads(runtime: dict[str, Any], cores: int | None = None) -> int:
    """The intra-op threads a stage runs with: ``configured_threads``, else
    ``OMP_NUM_THREADS`` or the cores in one process."""
    n = configured_threads(runtime, cores)
    if n is not None:
        return n
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else cores or os.cpu_count() or 1


def expected_key(recipe: str, nodes: dict[str, PlanNode], device: str, runtime: dict[str, Any]) -> ProfileKey:
    """The key a profile must have to serve this recipe as configured."""
    models = {n: m for n, pn in nodes.items() if (m := model_of(pn)) is not None}
    return ProfileKey(recipe=recipe, models=models, device=device.split(":")[0], dtype=str(runtime.get("dtype", "float32")),
                      microbatch_size=int(runtime.get("microbatch_size", 1)),
                      threads=intra_op_threads(runtime) if device.startswith("cpu") else 0)


def mismatches(profile: Profile, want: ProfileKey, nodes: dict[str, PlanNode]) -> list[tuple[str, str, str]]:
    """Every way ``profile`` does not fit: (what, the profile's value, the recipe's value)."""
    out = []
    for f in KEY_FIELDS:
        have, need = getattr(profile.key, f), getattr(want, f)
        if have != need:
            out.append((f, _show(have), _show(need)))
    for name, pn in nodes.items():
        nc = profile.nodes.get(name)
        if nc is None:
            out.append((f"node {name}", "not profiled", pn.kind))
        elif nc.kind != pn.kind or nc.num_parts != pn.num_parts:
            out.append((f"node {name}", f"{nc.kind} with {nc.num_parts} part(s)", f"{pn.kind} with {pn.num_parts} part(s)"))
        elif nc.digest and nc.digest != config_digest(pn):
            out.append((f"node {name}", "other parameters", "changed parameters (a profile holds for the parameters it was measured with)"))
    return out


def _show(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in sorted(v.items())) or "none"
    return str(v)


def load_profile(path: str | Path) -> Profile:
    """Read a profile file; ValueError with a readable reason when it is not one."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        p = p / "profile.json"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"no profile at '{p}'") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read profile '{p}': {exc}") from None
    if not isinstance(data, dict) or data.get("version") != PROFILE_VERSION or "nodes" not in data or "key" not in data:
        raise ValueError(f"'{p}' is not an mmpipe profile (version {PROFILE_VERSION})")
    try:
        return Profile.from_dict(data)
    except (TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"'{p}' is not a valid mmpipe profile: {exc}") from None


def hint_costs(nodes: dict[str, PlanNode]) -> Profile:
    """Costs from the kinds' hints: each heavy node totals 1.0, light nodes cost nothing,
    loops count one iteration. Nothing is in seconds, and nodes do not compare."""
    out = {}
    for name, pn in nodes.items():
        total = sum(pn.costs) or 1.0
        parts = [PartCost(time_s=0.0 if pn.light else c / total, cpu_s=0.0 if pn.light else c / total) for c in pn.costs]
        out[name] = NodeCost(kind=pn.kind, num_parts=pn.num_parts, parts=parts, loop=pn.loop, light=pn.light,
                             iterations_per_mb=1.0 if pn.loop else 0.0, trips_per_item=1.0 if pn.loop else 0.0)
    return Profile(key=ProfileKey("", {}, "", "", 0, 0), nodes=out, measured=False)
