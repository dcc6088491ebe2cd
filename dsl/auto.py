"""The balance step of the compiler: ``split: auto``, ``replicas: auto``, ``placement: auto``.

Between expanding nodes into parts (pass 4) and partitioning into stages (pass 5)
the compiler asks this module to:

- read the costs: the recipe's ``profile=`` (every mismatch with the recipe is a
  problem) or the kinds' cost hints (said so in the plan);
- fold light nodes into the heavy part they will share a stage with, and turn
  every heavy node into a balancer ``Segment`` (loop parts count their iterations);
- size the machine (``Resources``): on CPUs the stages share the host's cores and
  memory; GPUs get one stage copy each;
- solve, and write the cuts and copy counts into the plan nodes, and which loops take in
  the node before them (``with_previous``);
- after partitioning, with ``placement: auto``, put the copies on ranks or devices.

``predict`` (``dsl/predict.py``) then gives the plan its predicted numbers.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from mmpipe.dsl.balance import INF, Choice, Infeasible, Resources, Segment, least_copies, solve_joins
from mmpipe.dsl.costs import NodeCost, Profile, expected_key, hint_costs, intra_op_threads, load_profile, mismatches
from mmpipe.dsl.plan import Place, PlanNode, Stage
from mmpipe.dsl.schema import Problems, Recipe

AUTO = "auto"


@dataclass
class Auto:
    """The balance step's results, for the passes after it and for predictions."""

    costs: Profile
    source: str  # "profile PATH" or "cost hints"
    placement: dict[str, Any]  # what partition and placement checks see
    devices: list[str]  # placement: auto: the devices to use
    auto_places: bool = False
    dedicated: bool = False  # one stage copy per device (GPUs)
    choice: Choice | None = None
    segs: list[Segment] = field(default_factory=list)
    resources: Resources | None = None
    bandwidth: float = 0.0  # bytes/s between places (0: one device, no transfers)
    latency: float = 0.0
    notes: list[str] = field(default_factory=list)
    profile_path: str = ""
    machine: dict[str, Any] = field(default_factory=dict)  # balance options, cores filled in (the simulator's machine)


def wanted(recipe: Recipe) -> bool:
    """Does the recipe ask for the balancer or give a profile?"""
    return placement_auto(recipe) or bool(recipe.top.profile) or any(n.split_auto or n.replicas_auto for n in recipe.nodes)


def placement_auto(recipe: Recipe) -> bool:
    return recipe.top.placement.get("default") == AUTO


def profile_mode(recipe: Recipe, nodes: dict[str, PlanNode], splittable: dict[str, bool]) -> dict[str, Any]:
    """``mmpipe profile``: one piece per part, one copy per node; the placement to use
    (piece places mapped onto the parts they hold; ``placement: auto``: the first device)."""
    placement = dict(recipe.top.placement)
    if placement.get("default") == AUTO:
        placement = {"default": (recipe.top.balance.devices or ["cpu"])[0]}
    default = placement.get("default") if isinstance(placement.get("default"), str) else "cpu"
    default = _device_only(str(default), "cpu")
    placement = {k: ([_device_only(str(x), default) for x in v] if isinstance(v, (list, tuple)) else _device_only(str(v), default))
                 for k, v in placement.items()}
    for name, pn in nodes.items():
        if splittable.get(name) and pn.num_parts > 1:
            for k, (lo, hi) in enumerate(pn.pieces):
                where = placement.pop(f"{name}.{k}", None)
                if where is not None:
                    placement.update({f"{name}.{p}": where for p in range(lo, hi)})
            pn.split, pn.pieces = pn.num_parts, [[p, p + 1] for p in range(pn.num_parts)]
        pn.replicas, pn.with_previous = 1, False  # every part measured on its own
        for key in [k for k, v in placement.items() if k.split(".")[0] == name and isinstance(v, (list, tuple))]:
            placement[key] = placement[key][0]  # one copy: its first place
    return placement


def _device_only(value: str, default: str) -> str:
    """``rank1:cuda:0`` -> ``cuda:0``; ``rank1`` -> ``default`` (a profile runs in one process)."""
    if value.startswith("rank"):
        _, _, dev = value.partition(":")
        return dev or default
    return value


def prepare(recipe: Recipe, nodes: dict[str, PlanNode], order: list[str], splittable: dict[str, bool], problems: Problems,
            available: Callable[[str], bool]) -> Auto | None:
    """Costs, segments and the balancer's choice, written into ``nodes`` (None: nothing asked)."""
    if not wanted(recipe):
        return None
    top, bal = recipe.top, recipe.top.balance
    auto_places = placement_auto(recipe)
    placement = dict(top.placement)
    devices = list(bal.devices) or ["cpu"]
    if auto_places:
        for k in placement:
            if k != "default":
                problems.add(f"placement.{k}", "placement: auto places every node itself", f"remove placement.{k}, or place every node by hand (no auto)", placement[k], True)
        for i, d in enumerate(devices):
            if d.split(":")[0] not in ("cpu", "cuda", "mps", "xpu", "meta") or (d != "cpu" and not available(d)):
                problems.add(f"balance.devices[{i}]", f"device '{d}' is not available here", "list devices this machine has (cpu, cuda:N), or simulate: mmpipe plan --simulate", d, True)
        placement = {"default": devices[0]}
    elif bal.devices:
        problems.add("balance.devices", "balance.devices is only read by placement: auto", "add placement=auto, or remove balance.devices", bal.devices, True)
    if placement_auto(recipe):  # every heavy node is balanced
        for name, pn in nodes.items():
            spec = next(n for n in recipe.nodes if n.name == name)
            spec.split_auto = spec.split_auto or (splittable.get(name, False) and not pn.light)
            spec.replicas_auto = spec.replicas_auto or not pn.light
    for spec in recipe.nodes:
        if spec.split_auto and spec.name in nodes and not splittable.get(spec.name, False):
            problems.add(f"nodes.{spec.name}.split", f"{nodes[spec.name].kind} cannot be split", f"remove split or set nodes.{spec.name}.split=1", AUTO, True)
            spec.split_auto = False
    device = devices[0] if auto_places else device_types(nodes, placement)
    auto = Auto(costs=hint_costs(nodes), source="cost hints", placement=placement, devices=devices, auto_places=auto_places)
    auto.machine = dataclasses.asdict(bal)
    if top.profile:
        try:
            prof = load_profile(top.profile)
        except ValueError as exc:
            problems.add("profile", str(exc), "run `mmpipe profile RECIPE [overrides]` and pass profile=OUTPUT_DIR/profile.json", top.profile, True)
            return auto
        want = expected_key(top.name, nodes, device, _runtime(recipe))
        bad = mismatches(prof, want, nodes)
        for what, have, need in bad:
            problems.add("profile", f"the profile does not match: {what} is {have} there, {need} here",
                         f"profile again with these settings (mmpipe profile {top.name} ...), or use the settings it was measured with", top.profile, True)
        if bad:
            return auto
        auto.costs, auto.source, auto.profile_path = prof, f"profile {top.profile}", str(top.profile)
        auto.machine["cores"] = bal.cores or prof.cores
    else:
        auto.notes.append("no profile: balanced on the kinds' cost hints (relative within a node, not comparable across nodes); run `mmpipe profile` and pass profile=...")
    if not any(n.split_auto or n.replicas_auto for n in recipe.nodes):
        return auto  # a profile only: predictions, no choices
    _machine(auto, recipe, nodes)
    auto.segs = segments(nodes, order, auto.costs, recipe, auto.bandwidth, auto.latency)
    assert auto.resources is not None
    least = least_copies(auto.segs)
    grown = not recipe.top.balance.stages and auto.resources.budget < least
    if grown:  # an automatic budget never makes a plan impossible: every heavy node needs a stage
        auto.resources.budget = least
    auto.notes.append(_machine_note(auto, grown))
    try:
        auto.choice = solve_joins(auto.segs, auto.resources, join_pairs(nodes, order, recipe, auto.segs))
    except Infeasible as exc:
        problems.add("balance", f"the balancer found no plan: {exc}", "raise balance.stages or balance.memory_gb, use more ranks/devices, or cut nodes by hand (split: N)")
        return auto
    for name, pieces in auto.choice.pieces.items():
        pn = nodes[name]
        pn.split, pn.pieces, pn.replicas = len(pieces), [list(p) for p in pieces], auto.choice.replicas[name]
    for name in auto.choice.joins:
        nodes[name].with_previous = True
    return auto


def join_pairs(nodes: dict[str, PlanNode], order: list[str], recipe: Recipe, segs: list[Segment]) -> dict[int, bool]:
    """The segments the balancer may join with the loop after them (``solve_joins``), and
    whether they must: both cut by the balancer, one copy possible, and nothing from the
    node's last piece to the loop turns items into several (a loop admits whole items)."""
    specs = {n.name: n for n in recipe.nodes}
    out: dict[int, bool] = {}
    for i in range(len(segs) - 1):
        a, b = segs[i], segs[i + 1]
        want = specs[b.name].with_previous
        if a.loop or not b.loop or want is False or a.pieces is not None or b.pieces is not None:
            continue
        if (a.replicas or 1) > 1 or (b.replicas or 1) > 1:
            continue
        if any(nodes[n].expands for n in order[order.index(a.name): order.index(b.name)]):
            continue
        out[i] = want is True
    return out


def device_types(nodes: dict[str, PlanNode], placement: dict[str, Any]) -> str:
    """The device types the nodes' pieces are placed on, as a profile names them (``cpu``, ``cpu+cuda``)."""
    from mmpipe.dsl.stages import places_of

    types = {dev.split(":")[0] for name, pn in nodes.items() for k in range(pn.split) for _, dev in places_of(pn, k, placement)}
    return "+".join(sorted(types)) or "cpu"


def _runtime(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe.top.runtime)


def _machine(auto: Auto, recipe: Recipe, nodes: dict[str, PlanNode]) -> None:
    """The ``Resources`` the balancer plans for (see the module docstring)."""
    top, bal, rt = recipe.top, recipe.top.balance, recipe.top.runtime
    prof, host = auto.costs, auto.costs.host
    distributed = rt.backend == "distributed"
    device = auto.devices[0] if auto.auto_places else str(auto.placement.get("default") or "cpu")
    gpu = not device.startswith("cpu")
    places = rt.nproc if distributed else (len(auto.devices) if auto.auto_places else 1)
    threads = max(1, prof.key.threads or intra_op_threads(_runtime(recipe)))
    cores = (bal.cores or prof.cores) * (bal.hosts if distributed else 1)
    if gpu:
        mem = bal.memory_gb * 2**30 if bal.memory_gb else float(host.get("device_memory_bytes") or INF)
        auto.dedicated = auto.auto_places or distributed
        budget = bal.stages or max(places, 1)
        res = Resources(budget=budget, memory=mem, shared_memory=False, min_copies=rt.nproc if distributed else 1)
    else:
        mem = bal.memory_gb * 2**30 if bal.memory_gb else float(host.get("memory_bytes") or INF) * (bal.hosts if distributed else 1)
        budget = bal.stages or max(places, math.ceil(2 * cores / threads))
        # without a profile there are no CPU seconds: no floor from the cores
        res = Resources(budget=budget, cores=float(cores) if prof.measured else 0.0, memory=mem, shared_memory=True,
                        min_copies=rt.nproc if distributed else 1)
    auto.resources = res
    crossing = distributed or (auto.auto_places and len(set(auto.devices)) > 1)
    if crossing:
        gbs = bal.bandwidth_gbs if distributed and bal.hosts > 1 else bal.local_bandwidth_gbs
        auto.bandwidth, auto.latency = gbs * 1e9, bal.latency_ms / 1000.0


def _machine_note(auto: Auto, grown: bool) -> str:
    """What the balancer planned for, as ``mmpipe plan`` says it (``grown``: the automatic
    budget was raised to one stage copy per heavy node)."""
    res = auto.resources
    assert res is not None
    unit = "s" if auto.costs.measured else "(relative)"
    return (f"balancer: at most {res.budget} stage copies" + (" (one per heavy node: the automatic budget was smaller)" if grown else "")
            + (f", {res.cores:g} cores shared" if res.cores else "")
            + (f", {res.memory / 2**30:.1f} GiB {'per device' if not res.shared_memory else 'for all copies'}" if res.memory < INF else "")
            + (f", transfers at {auto.bandwidth / 1e9:g} GB/s + {1000 * auto.latency:g} ms" if auto.bandwidth else "") + f"; times in {unit}")


def segments(nodes: dict[str, PlanNode], order: list[str], costs: Profile, recipe: Recipe, bandwidth: float, latency: float) -> list[Segment]:
    """One ``Segment`` per heavy node, light nodes folded into the part whose stage they join
    (as ``partition_stages`` groups them: before a non-loop node, into its first part; right
    after a non-loop node, into its last part; next to a loop, a stage of their own)."""
    specs = {n.name: n for n in recipe.nodes}
    segs: list[Segment] = []
    pending = 0.0
    for name in order:
        pn, nc = nodes[name], costs.nodes[name]
        if pn.light:
            t = nc.time(0, nc.num_parts)
            if segs and not segs[-1].loop and pending == 0.0:
                segs[-1].times[-1] += t
                segs[-1].cpus[-1] += nc.cpu(0, nc.num_parts) / (float(costs.host.get("cpu_share", 1.0)) or 1.0)
            else:
                pending += t
            continue
        seg = _segment(pn, nc, bandwidth, latency, float(costs.host.get("cpu_share", 1.0)) or 1.0)
        if not pn.loop:
            seg.times[0] += pending
        pending = 0.0
        spec = specs[name]
        if not spec.split_auto:
            seg.pieces = [list(p) for p in pn.pieces]
        if not spec.replicas_auto:
            seg.replicas = pn.replicas
        segs.append(seg)
    return segs


def _segment(pn: PlanNode, nc: NodeCost, bandwidth: float, latency: float, share: float = 1.0) -> Segment:
    iters = nc.iterations_per_mb if nc.loop else 1.0
    times = [p.time_s * iters for p in nc.parts]
    # the cores a part keeps busy on a machine of its own: other processes' load is not planned for
    cpus = [p.cpu_s * iters / share for p in nc.parts]
    xfer = []
    for k, p in enumerate(nc.parts):
        # a stage ending inside a loop hands its carry on every iteration; a stage ending the
        # node hands the outputs on once
        hops = iters if (nc.loop and k < len(nc.parts) - 1) else 1.0
        xfer.append(hops * (p.out_bytes / bandwidth + latency) if bandwidth else 0.0)
    return Segment(pn.name, times, cpus, [float(p.param_bytes) for p in nc.parts], [float(p.act_bytes) for p in nc.parts], xfer, loop=pn.loop)


def assign_places(auto: Auto, stages: list[Stage], distributed: bool, nproc: int) -> None:
    """``placement: auto``: put each stage copy on a rank (distributed: the least-loaded rank
    without a copy of that stage) or a device (one process: devices in turn)."""
    if not auto.auto_places:
        return
    loads = _stage_loads(auto, stages)
    if distributed:
        rank_load = [0.0] * nproc
        prev = 0
        for st in stages:
            n = len(st.places)
            seconds, heavy = loads[st.index]
            if not heavy:  # a light stage of its own: with the stage before it
                ranks = [prev] * n
            else:
                ranks = []
                for _ in range(n):  # least-loaded rank, one without a copy of this stage first
                    r = min(range(nproc), key=lambda r: (r in ranks, rank_load[r], r))
                    ranks.append(r)
                ranks.sort()  # copies in rank order: the first is tried first, and rank 0 holds the inputs
            # Light stages count too: rank 0 reads the inputs (load + mel), so with two ranks
            # otherwise even, the next heavy stage goes to the other rank.
            for r in ranks:
                rank_load[r] += seconds / n
            st.replicas = [Place(r, auto.devices[r % len(auto.devices)]) for r in ranks]
            prev = ranks[0]
    else:
        nxt = 0
        for st in stages:
            if not loads[st.index][1] and st.index > 0:
                st.replicas = [Place(0, stages[st.index - 1].places[0].device) for _ in st.places]
            else:
                st.replicas = [Place(0, auto.devices[(nxt + k) % len(auto.devices)]) for k in range(len(st.places))]
                nxt += len(st.places)
    for st in stages:
        st.rank, st.device = st.replicas[0].rank, st.replicas[0].device


def _stage_loads(auto: Auto, stages: list[Stage]) -> list[tuple[float, bool]]:
    """Seconds per micro-batch of each stage, and whether it runs a heavy node."""
    from mmpipe.dsl.predict import stage_time

    return [(stage_time(auto.costs, st), any(not auto.costs.nodes[u.node].light for u in st.units)) for st in stages]
