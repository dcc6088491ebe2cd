"""A discrete-event simulation of the runtime's own schedule, from a profile.

It runs what ``runtime/`` does, with times from the profile instead of work:

- the batcher cuts the run's requests into micro-batches of ``runtime.microbatch_size``
  (all submitted at once, as ``mmpipe run`` does) and feeds the first stage;
- every stage copy is a worker with a bounded inbox (``runtime.queue_depth``): a worker
  whose next inbox is full waits (back-pressure); packets go to the next stage;
- a replicated node's copy is chosen per micro-batch as the runtime does (fewest live
  requests, ties in turn) and every later stage of that node follows it;
- loops: groups circulate through the body stages; the first body stage admits a new
  group while fewer than ``max_inflight`` circulate, else takes a returning group and
  tops it up with waiting items to ``batching.max_batch_size`` (continuous batching);
  each item runs its own trip count, drawn in turn from the profile's measured counts;
  an iteration costs the profiled time plus the profiled cost per item (``item_s``) for
  every item its group has above the profile's mean group (groups grow when topped up);
  items run the first body stage's prelude (``with_previous``) in the call that admits them;
- transfers between places take bytes / bandwidth + latency (between hosts
  ``balance.bandwidth_gbs``, inside one host ``balance.local_bandwidth_gbs``);
- the runtime's own cost: every stage call first holds the process's GIL for the
  profile's ``hop_s`` (measured by ``mmpipe profile`` on no-op stages), one call at a time
  per process, so tiny stages are bound by the interpreter, as they are;
- shared hardware (``dsl/sim_share.py``): work on one CPU host shares its cores with the
  other running ops and with the busy threads of other processes (``balance.background``;
  by default what the profile saw): an op keeps as many cores busy as the profile
  measured (its CPU time over its wall time, corrected for the share of a core the
  profile got). When ops ask for more cores than there are, they take turns as Linux
  does, in time slices of ``balance.time_slice_ms`` (by default Linux's: 0.75 ms x
  (1 + log2 cores)). A stage's call counts as busy from its first turn on a core, as the
  runtime's trace spans do. Profiled times are first turned back into unloaded work the
  same way. Work on one GPU shares it. A profile taken with ``--co-run`` also says how
  much slower each part ran while every other core ran the same recipe (memory-bound
  parts slow each other down): a stage's op runs that much slower in proportion to the
  other cores of its host that run ops at the same time.

So it predicts throughput, latency p50/p95, busy % per stage copy and the bubble for any
placement, including ones this machine cannot run. Pure Python, no torch.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from mmpipe.dsl.costs import Profile, load_profile
from mmpipe.dsl.plan import Plan
from mmpipe.dsl.predict import out_bytes, prelude_time, stage_corun, stage_cpu, stage_time
from mmpipe.dsl.sim_share import TINY, Sharing, linux_time_slice


@dataclass
class SimResult:
    """What the simulation predicts for one run."""

    requests: int
    microbatches: int
    wall_s: float
    throughput_rps: float
    latency_p50_s: float
    latency_p95_s: float
    bubble: float
    workers: list[dict[str, Any]] = field(default_factory=list)  # per stage copy: busy_s, busy_pct, calls

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


@dataclass
class _Pkt:
    items: list[int]  # item (request) ids
    mb: int
    group: int = -1
    fresh: int = 0  # items entering a loop with this call (they run its first stage's prelude)


@dataclass
class _Worker:
    stage: int
    copy: int
    time: float  # seconds per call (loop stages: per iteration)
    demand: float  # cores it keeps busy while computing
    resource: tuple[Any, ...]
    pre: float = 0.0  # a loop's first stage: seconds of prelude per entering item
    per_item: float = 0.0  # loop stages: seconds per item of a group above (below) ``items``
    items: float = 0.0  # loop stages: the group size ``time`` holds for
    inbox: deque[_Pkt] = field(default_factory=deque)
    back: deque[_Pkt] = field(default_factory=deque)  # loop first stage: returning groups
    reserved: int = 0  # inbox slots promised to packets still in transfer
    busy: float = 0.0
    calls: int = 0
    first: float = math.inf
    last: float = 0.0
    job: _Pkt | None = None  # what it computes, or holds while blocked
    left: float = 0.0  # seconds of work left
    gil_left: float = 0.0  # seconds of the runtime's own (GIL-bound) work left, done first
    proc: int = 0  # the process (rank) whose GIL it holds
    blocked: tuple[Any, ...] | None = None  # (target worker, packet) it waits to put
    inflight: int = 0  # loop first stage: groups circulating
    began: bool = False  # its current call has had a turn on a core
    slice_left: float = 0.0  # of its turn on a core
    corun: float = 1.0  # how much slower it runs with every other core busy (``sim_share``)


class Sim:
    """The simulation state (see the module docstring)."""

    def __init__(self, plan: Plan, costs: Profile, requests: int) -> None:
        self.plan, self.costs = plan, costs
        rt, bal = plan.runtime, (plan.predicted or {}).get("balance") or {}
        self.depth = max(1, int(rt.get("queue_depth", 4)))
        self.size = max(1, int(rt.get("microbatch_size", 1)))
        self.max_batch = max(1, int(plan.batching.get("max_batch_size", 8)))
        self.p = plan.num_stages
        self.requests = requests
        self.hosts = max(1, int(bal.get("hosts", 1)))
        self.cores = float(bal.get("cores") or costs.cores)
        share = float(costs.host.get("cpu_share", 1.0)) or 1.0
        bg = bal.get("background")
        background = float(bg) if bg is not None and float(bg) >= 0 else float(costs.host.get("background", 0.0))
        self.sharing = Sharing(self.cores, background, float(bal.get("time_slice_ms") or 0.0) / 1000.0 or linux_time_slice(self.cores))
        profiled_bg = float(costs.host.get("background", 0.0))
        threads = max(1, int(costs.key.threads or 1))
        self.hop = float(costs.host.get("hop_s", 0.0))
        self.bw_host = float(bal.get("bandwidth_gbs", 1.25)) * 1e9
        self.bw_local = float(bal.get("local_bandwidth_gbs", 4.0)) * 1e9
        self.latency = float(bal.get("latency_ms", 0.2)) / 1000.0
        ranks = plan.nproc
        self.per_host = max(1, math.ceil(ranks / self.hosts))
        self.w: dict[tuple[int, int], _Worker] = {}
        for st in plan.stages:
            calls = 1.0
            if st.loop:
                calls = costs.nodes[st.loop].iterations_per_mb or 1.0
            total, cpu = stage_time(costs, st), stage_cpu(costs, st)
            pre = prelude_time(costs, st)  # run once per item, as it enters
            t = (total - pre) / calls
            per_item, items = 0.0, 0.0
            if st.loop:  # an iteration's cost grows with its group (continuous batching tops groups up)
                lu, nc = st.loop_unit, costs.nodes[st.loop]
                per_item, items = sum(p.item_s for p in nc.parts[lu.parts[0]:lu.parts[1]]), nc.group_items
            for r, pl in enumerate(st.places):
                dev = pl.device
                host = pl.rank // self.per_host
                res = ("cpu", host) if dev.startswith("cpu") else ("dev", host, pl.rank if plan.distributed else 0, dev)
                scale, demand = 1.0, 1.0
                if res[0] == "cpu":
                    # cores it keeps busy (what it got, over the share a thread got), and its time unloaded
                    demand = min(float(threads), max(0.02, (cpu / total) / share)) if total > 0 else 0.0
                    scale = min(1.0, self.cores / (demand + profiled_bg)) if demand + profiled_bg > self.cores else 1.0
                self.w[(st.index, r)] = _Worker(st.index, r, t * scale, demand, res, pre=pre * scale / self.size,
                                                per_item=per_item * scale, items=items, proc=pl.rank,
                                                corun=stage_corun(costs, st) if res[0] == "cpu" else 1.0)
        loops = {lp.node: lp for lp in plan.loops}
        self.loop_of = {s: loops[lp] for s in range(self.p) if (lp := plan.stages[s].loop)}
        mi = int(rt.get("max_inflight", 0))
        self.max_inflight = {n: (mi if mi > 0 else max(2, len(lp.stages))) for n, lp in loops.items()}
        self.trips: dict[int, dict[str, int]] = {}  # item -> loop -> trips left
        samples = {n: (costs.nodes[n].trip_counts or [max(1, round(costs.nodes[n].trips_per_item or 1))]) for n in loops}
        for i in range(requests):
            self.trips[i] = {n: max(1, int(s[i % len(s)])) for n, s in samples.items()}
        self.copy_of: dict[tuple[int, str], int] = {}  # (mb, owner) -> copy
        self.live = {st.owner: [0] * len(st.places) for st in plan.stages if len(st.places) > 1}
        self.turn = {k: 0 for k in self.live}
        self.mb_of: dict[int, int] = {}
        self.done: dict[int, float] = {}
        self.transit: list[tuple[float, tuple[int, int], _Pkt, bool]] = []  # (arrival, worker, packet, back lane)
        self.now = 0.0
        self.gid = 0

    # ------------------------------------------------------------ routing
    def copy_for(self, s: int, pkt: _Pkt, prev: tuple[int, int] | None) -> int:
        st = self.plan.stages[s]
        if len(st.places) == 1:
            return 0
        if prev is not None and self.plan.stages[prev[0]].owner == st.owner:
            return prev[1]
        key = (pkt.mb, st.owner)
        if key not in self.copy_of:
            load, n = self.live[st.owner], len(st.places)
            start = self.turn[st.owner]
            best = min(range(n), key=lambda k: (load[(start + k) % n], k))
            c = (start + best) % n
            self.turn[st.owner] = (c + 1) % n
            self.copy_of[key] = c
            load[c] += len(pkt.items)
        return self.copy_of[key]

    def delay(self, a: tuple[int, int], b: tuple[int, int], nbytes: float) -> float:
        pa, pb = self.plan.stages[a[0]].places[a[1]], self.plan.stages[b[0]].places[b[1]]
        if (pa.rank, pa.device) == (pb.rank, pb.device):
            return 0.0
        bw = self.bw_host if pa.rank // self.per_host != pb.rank // self.per_host else self.bw_local
        return nbytes / bw + (self.latency if pa.rank != pb.rank else 0.0)

    def room(self, w: _Worker) -> bool:
        return len(w.inbox) + w.reserved < self.depth

    def send(self, src: tuple[int, int] | None, s: int, pkt: _Pkt, back: bool = False) -> bool:
        """Hand ``pkt`` to stage ``s`` (the collector when s == p); False: the inbox is full."""
        if s >= self.p:
            for i in pkt.items:
                self.done[i] = self.now
                if self.live:
                    for owner, load in self.live.items():
                        c = self.copy_of.get((self.mb_of[i], owner))
                        if c is not None:
                            load[c] -= 1
            return True
        r = self.copy_for(s, pkt, src)
        w = self.w[(s, r)]
        if not back and not self.room(w):
            return False
        d = 0.0
        if src is not None:
            b, hops = out_bytes(self.costs, self.plan.stages[src[0]])
            d = self.delay(src, (s, r), b * len(pkt.items) / max(1, self.size) if hops == 1.0 else b)
        if d > 0:
            if not back:
                w.reserved += 1
            self.transit.append((self.now + d, (s, r), pkt, back))
        else:
            (w.back if back else w.inbox).append(pkt)
        return True

    # ------------------------------------------------------------ workers
    def take(self, w: _Worker) -> _Pkt | None:
        lp = self.loop_of.get(w.stage)
        if lp is None or lp.stages[0] != w.stage:
            return w.inbox.popleft() if w.inbox else None
        if w.inflight < self.max_inflight[lp.node] and w.inbox:
            pkt = w.inbox.popleft()
            w.inflight += 1
            self.gid += 1
            return _Pkt(list(pkt.items), pkt.mb, self.gid, fresh=len(pkt.items))
        if w.back:
            g: _Pkt = w.back.popleft()
            g.fresh = 0
            while w.inbox and len(g.items) < self.max_batch:  # continuous batching: top up
                head = w.inbox[0]
                space = self.max_batch - len(g.items)
                g.fresh += len(head.items[:space])
                g.items += head.items[:space]
                head.items = head.items[space:]
                if not head.items:
                    w.inbox.popleft()
            return g
        return None

    def work(self, w: _Worker, pkt: _Pkt) -> float:
        """Seconds of work of one call: loops scale with the group (never below a tenth of the
        profiled iteration) and charge the prelude of the items entering."""
        t = w.time
        if w.per_item and w.items:
            t = max(0.1 * w.time, t + w.per_item * (len(pkt.items) - w.items))
        return t + w.pre * pkt.fresh

    def finish(self, w: _Worker) -> None:
        """The worker's call ended: hand its packet on (or block)."""
        pkt, key = w.job, (w.stage, w.copy)
        assert pkt is not None
        lp = self.loop_of.get(w.stage)
        if lp is not None and lp.stages[-1] == w.stage:
            first = self.w[(lp.stages[0], w.copy)]
            out: list[Any] = []
            again: list[Any] = []
            for i in pkt.items:
                self.trips[i][lp.node] -= 1
                (out if self.trips[i][lp.node] <= 0 else again).append(i)
            if again:
                self.send(key, lp.stages[0], _Pkt(again, pkt.mb, pkt.group), back=True)
            else:
                first.inflight -= 1
            if not out:
                w.job = None
                return
            pkt = _Pkt(out, pkt.mb)
        if self.send(key, w.stage + 1, pkt):
            w.job = None
        else:
            w.blocked, w.job = (w.stage + 1, pkt), None

    def step(self) -> bool:
        """Start what can start; advance to the next event. False when nothing is left."""
        progressed = True
        while progressed:
            progressed = False
            for key, w in self.w.items():
                if w.blocked is not None:
                    s, pkt = w.blocked
                    if self.send(key, s, pkt):
                        w.blocked = None
                        progressed = True
                if w.job is None and w.blocked is None:
                    pkt = self.take(w)
                    if pkt is not None:
                        w.job, w.left, w.gil_left = pkt, self.work(w, pkt), self.hop
                        w.began, w.slice_left = False, self.sharing.quantum
                        w.calls += 1
                        w.first = min(w.first, self.now)
                        progressed = True
            while self.feed and self.send(None, 0, self.feed[0]):
                self.feed.popleft()
                progressed = True
        running = [w for w in self.w.values() if w.job is not None]
        if not running and not self.transit:
            return False
        rates, turns = self.sharing.rates(running)

        def phase(w: _Worker) -> float:
            return w.gil_left if w.gil_left > TINY else w.left

        dt = min([phase(w) / rates[id(w)] for w in running if rates[id(w)] > 0] + [a - self.now for a, *_ in self.transit]
                 + [w.slice_left for w in turns] + [math.inf])
        dt = max(dt, 0.0)
        self.now += dt
        for w in running:
            if w.gil_left > TINY:
                w.gil_left -= dt * rates[id(w)]
            else:
                if rates[id(w)] > 0:
                    w.began = True
                w.left -= dt * rates[id(w)]
            if w.began or w.gil_left > TINY:  # a call's span starts on its first turn on a core
                w.busy += dt
        self.sharing.end_slices(turns, dt)
        for w in running:
            if w.gil_left <= TINY and w.left <= TINY:
                w.last = self.now
                self.finish(w)
        arrived = [t for t in self.transit if t[0] <= self.now + TINY]
        self.transit = [t for t in self.transit if t[0] > self.now + TINY]
        for _, key, pkt, back in arrived:
            w = self.w[key]
            if back:
                w.back.append(pkt)
            else:
                w.reserved -= 1
                w.inbox.append(pkt)
        return True

    def run(self) -> SimResult:
        mbs = [list(range(i, min(i + self.size, self.requests))) for i in range(0, self.requests, self.size)]
        self.feed = deque(_Pkt(items, k) for k, items in enumerate(mbs))
        for k, items in enumerate(mbs):
            for i in items:
                self.mb_of[i] = k
        guard = 0
        while self.step():
            guard += 1
            if guard > 10_000_000:
                raise RuntimeError("the simulation does not finish (a cycle of full queues?)")
        wall = max(self.done.values(), default=0.0)
        lat = sorted(self.done.values())
        workers, busy_total = [], 0.0
        start = min((w.first for w in self.w.values()), default=0.0)
        end = max((w.last for w in self.w.values()), default=0.0)
        for (s, r), w in sorted(self.w.items()):
            busy_total += w.busy
            workers.append({"stage": s, "replica": r, "busy_s": w.busy, "busy_pct": 100 * w.busy / wall if wall else 0.0, "calls": w.calls})
        window = max(end - start, TINY)
        return SimResult(self.requests, len(mbs), wall, self.requests / wall if wall else 0.0, _pct(lat, 0.5), _pct(lat, 0.95),
                         max(0.0, 1 - busy_total / (len(self.w) * window)), workers)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def simulate(plan: Plan, costs: Profile, requests: int) -> SimResult:
    """Simulate a run of ``requests`` requests of ``plan`` with ``costs``."""
    return Sim(plan, costs, requests).run()


def simulate_plan(plan: Plan, microbatches: int | None = None, requests: int | None = None) -> SimResult:
    """``mmpipe plan --simulate``: the plan's own profile; requests from ``requests``, else
    ``microbatches`` micro-batches, else the source's count, else 4 per stage."""
    pred = plan.predicted or {}
    costs = load_profile(str(pred.get("profile")))
    size = max(1, int(plan.runtime.get("microbatch_size", 1)))
    if requests is None:
        m = microbatches or pred.get("microbatches") or 4 * plan.num_stages
        requests = int(m) * size
    return simulate(plan, costs, requests)


def format_simulation(res: SimResult, plan: Plan) -> str:
    """The simulation as ``mmpipe plan --simulate`` prints it."""
    lines = [f"simulated run: {res.requests} requests in {res.microbatches} micro-batches of {plan.runtime.get('microbatch_size')}"]
    lines.append(f"  wall {res.wall_s:.3f} s, throughput {res.throughput_rps:.2f} req/s, latency p50 {res.latency_p50_s:.3f} s, "
                 f"p95 {res.latency_p95_s:.3f} s, bubble {100 * res.bubble:.0f}%")
    for w in res.workers:
        st = plan.stages[w["stage"]]
        copy = f" copy {w['replica']}" if w["replica"] else ""
        lines.append(f"  stage {w['stage']}{copy} @ {plan.where(st) if not copy else st.places[w['replica']].device}: busy {w['busy_pct']:.0f}% "
                     f"({w['calls']} calls)  {plan.stage_label(st)}")
    return "\n".join(lines)
