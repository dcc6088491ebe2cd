"""Measuring a profile: time, CPU time, memory and boundary bytes of every part of every node.

``measure(plan, requests)`` takes a plan compiled with one piece per part (the
compiler's ``profile`` mode: every splittable node at ``split = num_parts``), builds
every piece on the device its part would run on, and runs a few warm micro-batches
of ``runtime.microbatch_size`` requests through them, one piece after another:

- every piece (layers, blocks, light nodes too): wall time and CPU time (all threads
  of this process) per micro-batch;
- the bytes each piece hands on (the carry to the next piece, or the node's outputs);
- loops: each body piece per iteration (``begin``/``enter`` counted apart), the
  iterations a micro-batch's group runs (until its last item is done) and the
  iterations per item;
- memory: on CUDA, ``torch.cuda.max_memory_allocated`` around the piece; on the CPU an
  estimate, said so in the profile: the bytes of the tensors the piece holds (its
  weights) plus its inputs and outputs (loops: plus the per-item lanes, e.g. KV caches).

The intra-op thread count is the one the stages will run with
(``dsl.costs.intra_op_threads``), so per-part times carry over to the run.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

from mmpipe.dsl.costs import NodeCost, PartCost, Profile, config_digest, configured_threads, expected_key
from mmpipe.dsl.plan import Plan, Stage
from mmpipe.graphs.base import LoopKind, NodeKind, Request
from mmpipe.runtime.batch import MicroBatch, from_requests, to_device
from mmpipe.runtime.execute import LoopBody, Stream, node_inputs, retire_done, rows_to_batch, run_unit
from mmpipe.runtime.nodes import build_unit
from mmpipe.runtime.routing import build_routes


class _Acc:
    """Sums for one part over the timed micro-batches."""

    def __init__(self) -> None:
        self.time = self.cpu = 0.0
        self.calls = 0  # micro-batches (loops: iterations)
        self.out = self.act = self.lane = self.params = 0
        self.peak = 0
        self.sizes: list[tuple[int, float]] = []  # loops: (items, seconds) of every timed iteration
        self.wide: list[tuple[int, float]] = []  # loops: the same, in a group as large as batching allows


def nbytes(value: Any, seen: set[int] | None = None, depth: int = 0) -> int:
    """Bytes of the tensors inside ``value`` (dicts, lists, tuples, objects followed; each
    storage counted once)."""
    import torch

    seen = set() if seen is None else seen
    if depth > 6 or value is None or isinstance(value, (str, bytes, int, float, bool)):
        return 0
    if isinstance(value, torch.Tensor):
        try:
            storage = value.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
        except (NotImplementedError, RuntimeError):  # opaque layouts (oneDNN-prepacked weights) have no storage
            ptr, size = id(value), value.numel() * value.element_size()
        if ptr in seen:
            return 0
        seen.add(ptr)
        return int(size)
    if isinstance(value, torch.nn.Module):
        return sum(nbytes(t, seen, depth + 1) for t in list(value.parameters()) + list(value.buffers()))
    if isinstance(value, dict):
        return sum(nbytes(v, seen, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return sum(nbytes(v, seen, depth + 1) for v in value)
    if hasattr(value, "__dict__") and type(value).__module__.split(".")[0] in ("mmpipe", "__main__"):
        return sum(nbytes(v, seen, depth + 1) for k, v in vars(value).items() if k != "cfg")
    return 0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _mem_start(device: str) -> int:
    if not device.startswith("cuda"):
        return 0
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return int(torch.cuda.memory_allocated(device))


def _mem_peak(device: str, base: int) -> int:
    if not device.startswith("cuda"):
        return 0
    import torch

    return int(torch.cuda.max_memory_allocated(device)) - base


class Profiler:
    """Runs micro-batches through the pieces of a one-piece-per-part plan and keeps sums."""

    def __init__(self, plan: Plan, output_dir: str | None = None) -> None:
        for name, pn in plan.nodes.items():
            if pn.split != pn.num_parts and not pn.light:
                raise ValueError(f"node {name}: profiling needs one piece per part (split={pn.num_parts}), got split={pn.split}")
        self.plan = plan
        self.output_dir = output_dir
        self.insts: dict[tuple[str, int], NodeKind] = {}
        self.acc: dict[tuple[str, int], _Acc] = {}
        self.loops: dict[str, dict[str, Any]] = {}
        self.items: dict[str, list[int]] = {}
        self.in_bytes: dict[str, list[int]] = {}
        self.keys = build_routes(plan).input_keys
        self.recording = False
        self.sampling = False  # a wide group: loop iterations give (items, seconds) only
        # what entered the first loop in each earlier micro-batch: a wide group starts there
        # (its requests are those micro-batches'), instead of running the encoders again
        self.at_loop: list[MicroBatch] = []
        self.first_loop = next((i for i, st in enumerate(plan.stages) if st.loop), None)

    def device(self, st: Stage) -> str:
        return st.places[0].device

    def build(self) -> None:
        for st in self.plan.stages:
            for u in st.units:
                self.insts[(u.node, u.piece)] = build_unit(self.plan, u, self.device(st), self.output_dir)
                self.acc[(u.node, u.piece)] = _Acc()
                self.acc[(u.node, u.piece)].params = nbytes(self.insts[(u.node, u.piece)])

    def run(self, reqs: list[Request], record: bool, sample: bool = False) -> None:
        """One micro-batch through every piece, in plan order (``sample``: only the loops'
        iteration times by group size are kept)."""
        self.recording, self.sampling = record, sample
        mb = from_requests(self.plan, reqs, self.keys)
        start = 0
        if sample and self.first_loop is not None and (cached := self._cached(reqs)) is not None:
            mb, start = cached, self.first_loop
        done: set[str] = set()
        for i, st in enumerate(self.plan.stages[start:], start):
            dev = self.device(st)
            if st.loop:
                if st.loop not in done:
                    if i == self.first_loop and not sample:
                        self.at_loop.append(MicroBatch(list(mb.items), dict(mb.values)))
                    done.add(st.loop)
                    mb = self.run_loop(st.loop, mb)
                continue
            for u in st.units:
                node = self.plan.nodes[u.node]
                x_bytes = nbytes(node_inputs(self.plan, u.node, mb) if u.piece == 0 else mb.values.get(f"{u.node}#{u.piece - 1}"))
                if u.piece == 0:
                    self._note_node(u.node, len(mb.items), x_bytes)
                base = _mem_start(dev)
                t0, c0 = time.perf_counter(), time.process_time()
                res = run_unit(self.plan, u, self.insts[(u.node, u.piece)], mb, dev)
                # a streaming expansion's chunks are made as they are read: time them all, as one
                chunks = list(res) if isinstance(res, Stream) else [res]
                mb = MicroBatch.join(chunks) if chunks else mb.select([])
                _sync(dev)
                t1, c1 = time.perf_counter(), time.process_time()
                out = mb.values.get(f"{u.node}#{u.piece}") if u.piece < node.split - 1 else \
                    {p.name: mb.values.get(f"{u.node}.{p.name}") for p in node.out_ports}
                self._add((u.node, u.piece), t1 - t0, c1 - c0, nbytes(out), x_bytes + nbytes(out), _mem_peak(dev, base))

    def _cached(self, reqs: list[Request]) -> MicroBatch | None:
        """The first loop's input for ``reqs``, from earlier micro-batches (None: not all there)."""
        ids = [r.id for r in reqs]
        have = MicroBatch.join(self.at_loop) if self.at_loop else None
        if have is None or [m.request_id for m in have.items[:len(ids)]] != ids or any(m.of != 1 for m in have.items):
            return None
        return have.select(list(range(len(ids))))

    def _note_node(self, node: str, items: int, in_bytes: int) -> None:
        if self.recording:
            self.items.setdefault(node, []).append(items)
            self.in_bytes.setdefault(node, []).append(in_bytes)

    def _add(self, key: tuple[str, int], dt: float, dc: float, out: int, act: int, peak: int, calls: int = 1) -> None:
        if not self.recording:
            return
        a = self.acc[key]
        a.time += dt
        a.cpu += dc
        a.calls += calls
        a.out = max(a.out, out)
        a.act = max(a.act, act)
        a.peak = max(a.peak, peak)

    def run_loop(self, node: str, mb: MicroBatch) -> MicroBatch:
        """The whole loop for one micro-batch, each body piece timed per iteration."""
        plan = self.plan
        stages = [s for s in plan.stages if s.loop == node]
        bodies = [LoopBody(s.loop_unit, self.insts[(node, s.loop_unit.piece)], self.device(s)) for s in stages]  # type: ignore[arg-type]
        keys = [(node, s.loop_unit.piece) for s in stages]
        x = node_inputs(plan, node, mb)
        self._note_node(node, len(mb.items), nbytes(x))
        t0, c0 = time.perf_counter(), time.process_time()
        for b in bodies:
            b.enter(x, mb.items)
        first: LoopKind = bodies[0].inst
        carry = first.begin(to_device(x, bodies[0].device), mb.items)
        _sync(bodies[-1].device)
        enter_s, enter_cpu = time.perf_counter() - t0, time.process_time() - c0
        lanes = [nbytes(b.lanes) // max(1, len(mb.items)) for b in bodies]
        active = list(range(len(mb.items)))
        finished: dict[int, dict[str, Any]] = {}
        trips = [0] * len(mb.items)
        iters = 0
        while active:
            items = [mb.items[i] for i in active]
            for j, b in enumerate(bodies):
                base = _mem_start(b.device)
                t0, c0 = time.perf_counter(), time.process_time()
                carry = b.step(carry, items)
                if j == len(bodies) - 1:
                    carry, done, outs = b.inst.end(carry, items, b.lanes_for(items))
                _sync(b.device)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                act = nbytes(carry) + lanes[j] * len(items)
                self._add(keys[j], dt, dc, nbytes(carry) if j < len(bodies) - 1 else 0, act, _mem_peak(b.device, base))
                if self.recording:
                    self.acc[keys[j]].lane = max(self.acc[keys[j]].lane, lanes[j])
                    self.acc[keys[j]].sizes.append((len(items), dt))
                elif self.sampling:
                    self.acc[keys[j]].wide.append((len(items), dt))
            iters += 1
            for i in active:
                trips[i] += 1
            carry, active = retire_done(plan, node, bodies, carry, items, active, done, outs, finished)
        if self.recording:
            lp: dict[str, Any] = self.loops.setdefault(node, {"mbs": 0, "iters": 0, "trips": 0, "items": 0, "enter_s": 0.0, "enter_cpu": 0.0, "counts": []})
            lp["counts"] += trips
            lp["mbs"] += 1
            lp["iters"] += iters
            lp["trips"] += sum(trips)
            lp["items"] += len(trips)
            lp["enter_s"] += enter_s
            lp["enter_cpu"] += enter_cpu
        out = rows_to_batch(plan, mb.items, [finished[i] for i in range(len(mb.items))])
        mb.values.update(out.values)
        return mb

    def result(self, microbatches: int) -> Profile:
        """The profile of what was recorded."""
        import torch

        plan = self.plan
        nodes: dict[str, NodeCost] = {}
        for name, pn in plan.nodes.items():
            lp = self.loops.get(name)
            parts = []
            for k in range(pn.split):
                a = self.acc[(name, k)]
                n = max(1, a.calls)
                act = a.peak if a.peak else a.act
                # CPU time is this process's (clock ticks): at most what the intra-op threads can use
                cpu = min(a.cpu, a.time * max(1, torch.get_num_threads()))
                parts.append(PartCost(time_s=a.time / n, cpu_s=cpu / n, param_bytes=a.params, act_bytes=act, out_bytes=a.out, lane_bytes=a.lane,
                                      item_s=slope(a.sizes + a.wide)))
            nc = NodeCost(kind=pn.kind, num_parts=pn.num_parts, parts=parts, loop=pn.loop, light=pn.light, digest=config_digest(pn),
                          items_per_mb=_mean(self.items.get(name, [])), in_bytes=int(_mean(self.in_bytes.get(name, []))))
            if pn.loop and lp:
                nc.iterations_per_mb = lp["iters"] / lp["mbs"]
                nc.trips_per_item = lp["trips"] / max(1, lp["items"])
                nc.enter_s = lp["enter_s"] / lp["mbs"]
                nc.trip_counts = [int(t) for t in lp["counts"]]
                sizes = self.acc[(name, 0)].sizes
                nc.group_items = sum(k for k, _ in sizes) / len(sizes) if sizes else 0.0
                # entering runs once per micro-batch: spread over the iterations of the first piece
                if nc.iterations_per_mb:
                    parts[0].time_s += nc.enter_s / nc.iterations_per_mb
                    parts[0].cpu_s += lp["enter_cpu"] / lp["mbs"] / nc.iterations_per_mb
            nodes[name] = nc
        devs = sorted({self.device(st).split(":")[0] for st in plan.stages})
        key = expected_key(plan.recipe, plan.nodes, devs[0] if len(devs) == 1 else "+".join(devs), plan.runtime)
        cuda = any(d.startswith("cuda") for d in devs)
        return Profile(key=key, nodes=nodes, microbatches=microbatches, host=host_info(devs),
                       memory_method="cuda max_memory_allocated per piece" if cuda else
                       "estimate: bytes of the tensors each piece holds (weights) + its inputs and outputs per micro-batch (loops: + per-item lanes)")


def slope(samples: list[tuple[int, float]]) -> float:
    """Seconds per item of a loop iteration: the least-squares slope of time over group size
    (0 when the profile saw one size only, or time did not grow with the group)."""
    if len({k for k, _ in samples}) < 2:
        return 0.0
    n = len(samples)
    mk, mt = sum(k for k, _ in samples) / n, sum(t for _, t in samples) / n
    var = sum((k - mk) ** 2 for k, _ in samples)
    return max(0.0, sum((k - mk) * (t - mt) for k, t in samples) / var)


def _mean(xs: list[int]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def host_info(devs: list[str]) -> dict[str, Any]:
    """This machine: cores, memory, accelerator, load (recorded with the profile)."""
    import platform

    import torch

    info: dict[str, Any] = {"host": platform.node(), "cores": os.cpu_count() or 1, "threads": torch.get_num_threads(),
                            "torch": torch.__version__, "load_avg": round(os.getloadavg()[0], 2)}
    try:
        info["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    if "cuda" in devs and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, device_memory_bytes=int(props.total_memory))
    return info


def measure(plan: Plan, requests: list[Request], microbatches: int = 3, warmup: int = 1, output_dir: str | None = None,
            log: Callable[[str], None] | None = None) -> Profile:
    """Profile ``plan`` (one piece per part) on ``warmup`` + ``microbatches`` micro-batches of
    ``runtime.microbatch_size`` requests (the requests are reused when there are too few);
    with loops, then one micro-batch of ``batching.max_batch_size`` requests, whose loop
    iterations give the cost per item of larger groups."""
    import torch

    if not requests:
        raise ValueError("profiling needs at least one request")
    threads = configured_threads(plan.runtime)
    if threads is not None:
        torch.set_num_threads(threads)  # as the stage workers will (else torch's default)
    size = max(1, int(plan.runtime.get("microbatch_size", 1)))
    need = (warmup + microbatches) * size
    reqs = [r if i < len(requests) else Request(f"{r.id}~{i // len(requests)}", r.values, r.input, r.params)
            for i, r in ((i, requests[i % len(requests)]) for i in range(max(need, len(requests))))]
    prof = Profiler(plan, output_dir)
    failure: list[BaseException] = []
    wide = min(int(plan.batching.get("max_batch_size", size)), len(reqs)) if plan.loops else 0

    shares: list[tuple[float, float]] = []

    def work() -> None:
        try:
            shares.append(cpu_share())
            prof.build()
            with torch.inference_mode():
                for k in range(warmup + microbatches):
                    group = reqs[k * size:(k + 1) * size]
                    t0 = time.perf_counter()
                    prof.run(group, record=k >= warmup)
                    if log:
                        log(f"  micro-batch {k + 1}/{warmup + microbatches} ({'warm-up' if k < warmup else 'timed'}): {time.perf_counter() - t0:.3f} s")
                if wide > size:  # continuous batching tops loop groups up: time one that large
                    t0 = time.perf_counter()
                    prof.run(reqs[:wide], record=False, sample=True)
                    if log:
                        log(f"  a group of {wide} (how a loop iteration's time grows with its group): {time.perf_counter() - t0:.3f} s")
            shares.append(cpu_share())
        except BaseException as exc:  # raised again in the caller's thread
            failure.append(exc)

    # Stages run in worker threads, and torch's intra-op threading behaves differently in the
    # main thread (small ops there ran 5x slower here): measure where the stages will run.
    t = threading.Thread(target=work, name="mmpipe-profile", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.2)  # short joins: Ctrl-C still reaches the main thread
    if failure:
        raise failure[0]
    out = prof.result(microbatches)
    share = sum(sh for sh, _ in shares) / len(shares) if shares else 1.0
    out.host["cpu_share"] = round(share, 3)
    # busy threads of other processes: what one thread of ours got (fair sharing of the cores),
    # or what the kernel counted runnable (sees them even when a core was free for us)
    seen = max(0.0, out.cores / share - 1.0) if share < 0.95 else 0.0
    counted = sum(o for _, o in shares) / len(shares) if shares else 0.0
    out.host["background"] = round(max(seen, counted), 2)
    return out


def hop_overhead(plan: Plan, requests: list[Request]) -> float:
    """The runtime's own seconds per stage call (GIL-bound Python: queues, routing, results),
    from a run of ``plan``: no-op stages, one request per micro-batch, many of them."""
    from mmpipe.runtime.pipeline import Pipeline

    with Pipeline(plan) as pipe:
        pipe.run(requests[: max(2, len(requests) // 4)])  # warm up
        t0 = time.perf_counter()
        pipe.run(requests)
        wall = time.perf_counter() - t0
    return wall / (len(requests) * plan.num_stages)


def cpu_share(seconds: float = 0.25) -> tuple[float, float]:
    """(the share of a core one busy thread gets here now, 1.0 on an idle machine; the runnable
    threads of other processes, from /proc/loadavg while this one spins)."""
    t0, c0 = time.perf_counter(), time.thread_time()
    runnable: list[int] = []
    x, nxt = 0, t0
    while (now := time.perf_counter()) - t0 < seconds:
        x += 1
        if now >= nxt:
            nxt = now + 0.01
            try:
                with open("/proc/loadavg") as f:
                    runnable.append(int(f.read().split()[3].split("/")[0]))
            except (OSError, ValueError, IndexError):
                pass
    wall = time.perf_counter() - t0
    share = min(1.0, (time.thread_time() - c0) / wall) if wall > 0 else 1.0
    others = max(0.0, sum(runnable) / len(runnable) - 1.0) if runnable else 0.0  # minus this thread
    return share, others


def format_profile(p: Profile) -> str:
    """A table: per part, time and CPU per micro-batch (per iteration in loops), memory, bytes handed on."""
    corun = any(pc.corun != 1.0 for nc in p.nodes.values() for pc in nc.parts) or "corun" in p.host
    rows = [("node", "part", "kind", "ms/mb", "cores", "memory MB", "out KB") + (("co-run",) if corun else ()) + ("note",)]
    for name, nc in p.nodes.items():
        for k, pc in enumerate(nc.parts):
            note = ""
            if nc.loop:
                note = f"per iteration; {nc.iterations_per_mb:.1f} iterations/mb, {nc.trips_per_item:.1f} per item"
            elif nc.light:
                note = "light"
            rows.append((name, f"{k}/{nc.num_parts}" if nc.num_parts > 1 else "-", nc.kind, f"{1000 * pc.time_s:.2f}",
                         f"{pc.cpu_s / pc.time_s:.2f}" if pc.time_s > 0 else "-", f"{pc.memory_bytes / 2**20:.1f}",
                         f"{pc.out_bytes / 1024:.1f}") + ((f"{pc.corun:.2f}x",) if corun else ()) + (note if k == 0 else "",))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    key = p.key
    lines.append(f"key: recipe={key.recipe} device={key.device} dtype={key.dtype} microbatch_size={key.microbatch_size} threads={key.threads}"
                 + (f" models: {', '.join(f'{n}={m}' for n, m in key.models.items())}" if key.models else ""))
    lines.append(f"{p.microbatches} timed micro-batch(es); memory: {p.memory_method}; load average {p.host.get('load_avg')}, "
                 f"a thread got {100 * float(p.host.get('cpu_share', 1.0)):.0f}% of a core (other processes: ~{p.host.get('background', 0)} busy threads)")
    if corun:
        lines.append(f"co-run: each part's time while {p.host.get('corun', {}).get('co_runners', '?')} process(es) ran the recipe on the other "
                     "cores, over its time alone (the simulator slows a stage by it while other cores are busy)")
    return "\n".join(lines)
