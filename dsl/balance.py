"""The balancer: where to cut nodes into stages and how many copies each node gets.

The pipeline's period (seconds per micro-batch in steady state) is set by its
slowest stage copy, so the balancer minimises

    period = max( max over stages of (compute + transfer out) / copies,   # each copy is one worker
                  total CPU seconds / cores )                              # stages that share cores

subject to the memory limit: each copy's own device (``dedicated``: GPUs, one
copy each) or one memory for every copy (``shared``: the CPU of one host). The
second term is what stages sharing a host's cores cannot beat: it is what makes
more copies pointless once the cores are busy. Among choices with the same
period it takes the fewest copies, then the fewest stages in a row (a shallower
pipeline fills sooner and hands on less), then the smallest slowest stage, then
the least memory.

A ``Segment`` is one heavy node (light neighbours folded into its first or last
part): stages are contiguous ranges of its parts, never spanning two heavy nodes
(the partition pass gives every heavy piece a stage of its own), with one
exception: a loop's first stage may take in the last piece of the node before
it (``with_previous``). ``solve_joins`` tries that as one ``joined`` segment of
the two nodes, whose one stage may span their boundary. A segment may
have fixed cuts or a fixed copy count (``split: N`` / ``replicas: N``); loop
parts count their iterations per micro-batch. Replicas are per node, as the
runtime keeps all pieces of one node copy together.

``solve`` is exact: per node and piece count, a dynamic programme over cut
positions keeps the Pareto front of (slowest piece, memory); nodes combine by
copies used, again keeping Pareto fronts. Tested against brute force.
"""
from __future__ import annotations

from typing import Any

from dataclasses import dataclass, field

INF = float("inf")
EPS = 1e-9


@dataclass
class Segment:
    """One heavy node's parts as the balancer sees them (see the module docstring)."""

    name: str
    times: list[float]  # seconds per micro-batch of each part (loops: all iterations)
    cpus: list[float] = field(default_factory=list)  # CPU seconds per part (default: = times)
    params: list[float] = field(default_factory=list)  # bytes held by each part (weights)
    acts: list[float] = field(default_factory=list)  # peak activation bytes of each part
    xfer: list[float] = field(default_factory=list)  # seconds to hand on after part k when a stage ends there
    loop: bool = False
    pieces: list[list[int]] | None = None  # fixed cuts ([lo, hi) ranges), or None: the balancer cuts
    replicas: int | None = None  # fixed copy count, or None: the balancer chooses
    # a ``joined`` segment: parts [0, join_at) are the first node's of ``joined`` (node, loop),
    # the rest the loop's; ``must_join``: one stage spans join_at
    join_at: int | None = None
    must_join: bool = False
    joined: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        n = len(self.times)
        self.cpus = list(self.cpus) or list(self.times)
        self.params = list(self.params) or [0.0] * n
        self.acts = list(self.acts) or [0.0] * n
        self.xfer = list(self.xfer) or [0.0] * n
        if not all(len(x) == n for x in (self.cpus, self.params, self.acts, self.xfer)):
            raise ValueError(f"segment {self.name}: one value per part in every list")

    def allowed(self, lo: int, hi: int) -> bool:
        """May parts [lo, hi) form one stage? (Only a joined segment says no.)"""
        return not (self.must_join and self.join_at in (lo, hi))

    def stage_time(self, lo: int, hi: int) -> float:
        return sum(self.times[lo:hi]) + self.xfer[hi - 1]

    def stage_memory(self, lo: int, hi: int) -> float:
        return sum(self.params[lo:hi]) + max(self.acts[lo:hi])


@dataclass
class Resources:
    """What the stages run on."""

    budget: int  # most stage copies in all
    cores: float = 0.0  # > 0: the copies share this many cores (period >= CPU seconds / cores)
    memory: float = INF  # bytes: of each copy's device (dedicated) or of all copies together (shared)
    shared_memory: bool = False
    max_replicas: int = 0  # most copies of one node (0: the budget)
    min_copies: int = 1  # fewest stage copies (a distributed run needs a stage on every rank)


@dataclass
class Choice:
    """The balancer's answer."""

    pieces: dict[str, list[list[int]]]
    replicas: dict[str, int]
    period: float  # predicted seconds per micro-batch
    slowest: float  # the slowest stage copy: (compute + transfer) / copies
    floor: float  # total CPU seconds / cores (0 without shared cores)
    copies: int
    memory: float  # bytes: the largest copy (dedicated) or all copies (shared)
    depth: int = 0  # stages in a row (copies of one stage count once)
    joins: list[str] = field(default_factory=list)  # loop nodes whose first stage takes in the node before

    def rank(self) -> tuple[float, int, int, float, float]:
        """What ``solve`` minimises, in order (see the module docstring)."""
        return (self.period, self.copies, self.depth, self.slowest, self.memory)

    def stage_times(self, segs: list[Segment]) -> list[tuple[str, int, float, float]]:
        """(node, piece, seconds per micro-batch of one copy, memory of one copy) per stage."""
        by = {s.name: s for s in segs}
        return [(name, k, by[name].stage_time(lo, hi), by[name].stage_memory(lo, hi))
                for name, ps in self.pieces.items() for k, (lo, hi) in enumerate(ps)]


class Infeasible(ValueError):
    """No choice fits the budget and the memory limit (the message says which binds)."""


# (slowest, memory, payload); fronts are sorted by slowest with strictly falling memory
Front = list[tuple[float, float, Any]]


def _pareto(points: list[tuple[float, float, Any]]) -> Front:
    out: Front = []
    for t, m, p in sorted(points, key=lambda x: (x[0], x[1])):
        if not out or m < out[-1][1] - EPS:
            out.append((t, m, p))
    return out


def cut_fronts(seg: Segment, k: int, limit: float) -> Front:
    """Cuts of ``seg`` into ``k`` pieces: the Pareto front of (slowest piece, memory of one copy
    of every piece), each piece's memory within ``limit``. Payload: the pieces."""
    n = len(seg.times)
    if seg.pieces is not None:
        if len(seg.pieces) != k:
            return []
        if any(seg.stage_memory(lo, hi) > limit for lo, hi in seg.pieces):
            return []
        return [(max(seg.stage_time(lo, hi) for lo, hi in seg.pieces), sum(seg.stage_memory(lo, hi) for lo, hi in seg.pieces), seg.pieces)]
    if not 1 <= k <= n:
        return []
    # F[g][i]: first i parts in g pieces -> front of (slowest, memory, cut positions)
    F: list[list[Front]] = [[[] for _ in range(n + 1)] for _ in range(k + 1)]
    F[0][0] = [(0.0, 0.0, ())]
    for g in range(1, k + 1):
        for i in range(g, n - (k - g) + 1):
            pts = []
            for j in range(g - 1, i):
                mem = seg.stage_memory(j, i)
                if mem > limit or not F[g - 1][j] or not seg.allowed(j, i):
                    continue
                t = seg.stage_time(j, i)
                pts += [(max(t0, t), m0 + mem, cuts + (j,)) for t0, m0, cuts in F[g - 1][j]]
            F[g][i] = _pareto(pts)
    out = []
    for t, m, cuts in F[k][n]:
        bounds = list(cuts[1:]) + [n]
        out.append((t, m, [[lo, hi] for lo, hi in zip(cuts, bounds)]))
    return out


def node_options(seg: Segment, res: Resources) -> dict[tuple[int, int], Front]:
    """(copies used (pieces x replicas), pieces) -> front of (slowest copy, memory of all copies,
    (pieces, replicas))."""
    n = len(seg.times)
    ks = [len(seg.pieces)] if seg.pieces is not None else list(range(1, n + 1))
    top = res.max_replicas or res.budget
    rs = [seg.replicas] if seg.replicas is not None else list(range(1, top + 1))
    per_copy = INF if res.shared_memory else res.memory
    out: dict[tuple[int, int], list[tuple[float, float, object]]] = {}
    fronts = {k: cut_fronts(seg, k, per_copy) for k in ks}
    for r in rs:
        for k in ks:
            if k * r > res.budget:
                continue
            for t, m, pieces in fronts[k]:
                out.setdefault((k * r, k), []).append((t / r, m * r, (pieces, r)))
    return {c: _pareto(v) for c, v in out.items()}


def solve(segs: list[Segment], res: Resources) -> Choice:
    """The best cuts and copies (see the module docstring); ``Infeasible`` if none fits."""
    floor = sum(sum(s.cpus) for s in segs) / res.cores if res.cores > 0 else 0.0
    # (copies used, stages in a row) -> front of (slowest, memory, list of per-node choices)
    state: dict[tuple[int, int], Front] = {(0, 0): [(0.0, 0.0, ())]}
    for seg in segs:
        opts = node_options(seg, res)
        nxt: dict[tuple[int, int], list[tuple[float, float, object]]] = {}
        for (used, depth), front in state.items():
            for (c, k), ofront in opts.items():
                if used + c > res.budget:
                    continue
                for t0, m0, picks in front:
                    for t, m, pick in ofront:
                        mem = m0 + m
                        if res.shared_memory and mem > res.memory:
                            continue
                        nxt.setdefault((used + c, depth + k), []).append((max(t0, t), mem, picks + (pick,)))
        state = {c: _pareto(v) for c, v in nxt.items() if v}
        if not state:
            break
    best: tuple[Any, ...] | None = None
    for (copies, depth), front in state.items():
        if copies < res.min_copies:
            continue
        for t, m, picks in front:
            period = max(t, floor)
            rank = (period, copies, depth, t, m)
            if best is None or _better(rank, best[0]):
                best = (rank, picks, copies, t, m)
    if best is None:
        need = least_copies(segs)
        if need > res.budget:
            raise Infeasible(f"the nodes need at least {need} stage copies, the budget is {res.budget}")
        if res.min_copies > res.budget:
            raise Infeasible(f"{res.min_copies} stage copies are needed (one per rank), the budget is {res.budget}")
        raise Infeasible(f"no cut fits the memory limit of {res.memory / 2**30:.2f} GiB")
    rank, picks, copies, slowest, mem = best
    pieces = {s.name: p[0] for s, p in zip(segs, picks)}
    replicas = {s.name: p[1] for s, p in zip(segs, picks)}
    if not res.shared_memory:
        mem = max((s.stage_memory(lo, hi) for s in segs for lo, hi in pieces[s.name]), default=0.0)
    return Choice(pieces, replicas, max(slowest, floor), slowest, floor, copies, mem, depth=rank[2])


def joined(a: Segment, b: Segment, must: bool = False) -> Segment:
    """Node ``a`` and the loop ``b`` after it as one segment, one copy each: a stage may span
    their boundary (``b``'s first stage takes in ``a``'s last piece)."""
    return Segment(f"{a.name}+{b.name}", a.times + b.times, a.cpus + b.cpus, a.params + b.params, a.acts + b.acts,
                   a.xfer + b.xfer, loop=True, replicas=1, join_at=len(a.times), must_join=must, joined=(a.name, b.name))


def solve_joins(segs: list[Segment], res: Resources, pairs: dict[int, bool]) -> Choice:
    """``solve`` with joins: ``pairs`` maps the index of a node whose next segment is a loop
    that may take it in to whether it must. Every subset of the optional joins is solved;
    the best answer, in per-node pieces, with ``joins`` naming the loops that take in the
    node before them."""
    optional = [i for i, must in pairs.items() if not must]
    best: Choice | None = None
    error: Infeasible | None = None
    for mask in range(2 ** len(optional)):
        chosen = {i for k, i in enumerate(optional) if mask >> k & 1} | {i for i, must in pairs.items() if must}
        merged: list[Segment] = []
        i = 0
        while i < len(segs):
            if i in chosen:
                merged.append(joined(segs[i], segs[i + 1], pairs[i]))
                i += 2
            else:
                merged.append(segs[i])
                i += 1
        try:
            got = _unjoin(solve(merged, res), merged)
        except Infeasible as exc:
            error = error or exc
            continue
        if best is None or _better(got.rank(), best.rank()):
            best = got
    if best is None:
        assert error is not None
        raise error
    return best


def _unjoin(choice: Choice, segs: list[Segment]) -> Choice:
    """A choice over joined segments, in the pieces of each node."""
    pieces: dict[str, list[list[int]]] = {}
    replicas: dict[str, int] = {}
    joins: list[str] = []
    for s in segs:
        got, r = choice.pieces[s.name], choice.replicas[s.name]
        if s.join_at is None or s.joined is None:
            pieces[s.name], replicas[s.name] = got, r
            continue
        at, (first, loop) = s.join_at, s.joined
        pieces[first] = [[lo, min(hi, at)] for lo, hi in got if lo < at]
        pieces[loop] = [[max(lo, at) - at, hi - at] for lo, hi in got if hi > at]
        replicas[first] = replicas[loop] = r
        if any(lo < at < hi for lo, hi in got):
            joins.append(loop)
    return Choice(pieces, replicas, choice.period, choice.slowest, choice.floor, choice.copies, choice.memory, choice.depth, joins)


def least_copies(segs: list[Segment]) -> int:
    """The fewest stage copies any plan of ``segs`` needs (fixed cuts and copies as given,
    one copy of one stage for the rest)."""
    return sum(len(s.pieces) * (s.replicas or 1) if s.pieces is not None else (s.replicas or 1) for s in segs)


def _better(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Lexicographic with a relative tolerance on times (equal periods compare by copies)."""
    for x, y in zip(a, b):
        if isinstance(x, float) and isinstance(y, float):
            if x < y * (1 - 1e-9) - EPS:
                return True
            if x > y * (1 + 1e-9) + EPS:
                return False
        elif x != y:
            return bool(x < y)
    return False

