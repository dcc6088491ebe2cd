"""The pipelined runtime (``runtime.backend=threads``): one worker thread per stage.

Requests go through a batcher thread (``supervise.py``, ``batching.py``) that
cuts them into micro-batches; stage workers take packets from bounded inboxes
(back-pressure), run their node pieces and hand results on without any flush between
micro-batches (``stage.py``); loop bodies re-circulate items with continuous
batching (``loop.py``); values for non-adjacent stages go through the side
store (``channels.py``). Results are assembled as soon as a request's last item
leaves the last stage, and each request's ``Future`` is resolved.

Failures stay local: a node error fails only the requests it touched (after
retrying the micro-batch item by item); a watchdog fails what is left, with a
message naming the stage, when a stage stops making progress for
``runtime.timeout_s``; ``close`` joins every thread. The interface matches
``SequentialExecutor`` (the oracle), plus ``submit`` and ``stream``. After a
stall the pipeline stays stopped (every later request fails at once with the
stall's message) until ``close()`` and ``start()``.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from mmpipe.dsl.plan import Plan
from mmpipe.graphs.base import ItemMeta, NodeKind, Request
from mmpipe.runtime.batch import row
from mmpipe.runtime.batching import LengthFn
from mmpipe.runtime.channels import SLICE_S, Inbox, Packet, SideStore
from mmpipe.runtime.execute import NodeError
from mmpipe.runtime.loop import LoopNode, LoopWorker
from mmpipe.runtime.nodes import build_unit, kind_class
from mmpipe.runtime.results import Result, assemble
from mmpipe.runtime.routing import INPUTS, build_routes
from mmpipe.runtime.stage import StageWorker
from mmpipe.runtime.supervise import Batcher, Watchdog
from mmpipe.runtime.trace import Recorder
from mmpipe.runtime.transfer import Mover, wait_ready

Progress = Callable[[Result], None]
THREAD_PREFIX = "mmpipe-"


@dataclass
class _Live:
    """A request in flight: its future, start time, per-stage time and finished rows."""

    req: Request
    future: "Future[Result]"
    t0: float
    stage_s: list[float]
    keep: bool  # submitted by run/stream: also kept in ``Pipeline.completed``
    rows: list[tuple[ItemMeta, dict[str, Any]]] = field(default_factory=list)


class Pipeline:
    """Runs a plan as a pipeline of stage workers (see the module docstring)."""

    def __init__(self, plan: Plan, output_dir: str | None = None, length_of: LengthFn | None = None) -> None:
        """``length_of``: a request's length for ``batching.length_buckets`` (default:
        ``params["length"]``, else the size of its largest tensor input)."""
        self.plan = plan
        self.output_dir = output_dir
        self.p = plan.num_stages
        rt = plan.runtime
        self.timeout_s = float(rt.get("timeout_s", 600))
        self.depth = int(rt.get("queue_depth", 4))
        self.max_batch = int(plan.batching.get("max_batch_size", 8))
        self.length_of = length_of
        self.routes = build_routes(plan)
        self.recorder = Recorder([plan.stage_label(s) for s in plan.stages], [s.device for s in plan.stages])
        self.insts: dict[tuple[str, int], NodeKind] = {}
        self.store = SideStore()
        # Results of the current run()/stream() as they finish: still there after Ctrl-C.
        self.completed: list[Result] = []
        self._reqs: dict[str, _Live] = {}
        self._lock = threading.Lock()  # guards _reqs membership and resolving futures
        self._threads: list[threading.Thread] = []
        self.stop_event = threading.Event()
        self._broken: str | None = None
        self._started = False
        self._movers: dict[tuple[int, str], Mover] = {}
        # watchdog state, one slot per stage (written by its worker only)
        self.busy_since: list[float | None] = [None] * self.p
        self.busy_node: list[str] = [""] * self.p
        self.last_progress = time.monotonic()
        # made by start()
        self.inboxes: list[Inbox] = []
        self.loops: dict[str, LoopNode] = {}
        self.workers: list[StageWorker] = []
        self.batcher: Batcher

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "Pipeline":
        """Build every piece (weights load here) and start the threads."""
        if self._started:
            return self

        for s in self.plan.stages:
            for u in s.units:
                if (u.node, u.piece) not in self.insts:
                    self.insts[(u.node, u.piece)] = build_unit(self.plan, u, s.device, self.output_dir)
        self.stop_event.clear()
        self._broken = None
        self.inboxes = [Inbox(self._inbox_depth(s), self.stop_event.is_set) for s in range(self.p)]
        self.loops = {lp.node: LoopNode(self, lp.node, lp.stages) for lp in self.plan.loops}
        self.workers = [LoopWorker(self, s.index, self.loops[s.loop]) if s.loop else StageWorker(self, s.index) for s in self.plan.stages]
        self.batcher = Batcher(self)
        # Daemon threads: a node call that never returns must not keep the process alive.
        bodies = [(w.run, f"stage{w.s}") for w in self.workers] + [(self.batcher.run, "batcher"), (Watchdog(self).run, "watchdog")]
        self._threads = [threading.Thread(target=fn, name=THREAD_PREFIX + name, daemon=True) for fn, name in bodies]
        self._started = True
        self.last_progress = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def _inbox_depth(self, s: int) -> int:
        st = self.plan.stages[s]
        # Inside a loop body (not its first stage) admission bounds the queue instead.
        if st.loop and self.loops_first(st.loop) != s:
            return 1 << 30
        return self.depth

    def loops_first(self, node: str) -> int:
        return next(lp.stages[0] for lp in self.plan.loops if lp.node == node)

    def close(self) -> None:
        """Stop and join every thread; unfinished requests get an error result."""
        if not self._started:
            self.insts.clear()
            return
        self.stop_event.set()
        for ib in self.inboxes:
            ib.wake()
        self.batcher.wake()
        # A node call cannot be interrupted: give a hanging one a bounded while to return.
        deadline = time.monotonic() + self.timeout_s + 5.0
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        self._fail_all({"type": "Closed", "message": self._broken or "the pipeline was closed before the request finished",
                        "stage": None, "node": None})
        self.store.clear()
        self._threads = [t for t in self._threads if t.is_alive()]  # only a node that never returned
        self._started = False
        self.insts.clear()

    def __enter__(self) -> "Pipeline":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ public API
    def submit(self, request: Request) -> "Future[Result]":
        """Queue one request; the future resolves to its ``Result`` (errors included)."""
        return self._submit([request], flush=False)[0]

    def stream(self, requests: Iterable[Request]) -> Iterator[Result]:
        """Results in completion order. Ctrl-C closes the pipeline (finished results stay in ``completed``)."""
        reqs = list(requests)
        if not self._reqs:  # a new measurement starts when the pipeline is idle
            self.recorder.reset()
            self.completed = []
        done: "queue.SimpleQueue[Future[Result]]" = queue.SimpleQueue()
        futures = self._submit(reqs, flush=True, on_done=done.put)
        try:
            for _ in futures:
                while True:
                    try:
                        fut = done.get(timeout=SLICE_S * 4)
                        break
                    except queue.Empty:
                        continue  # the watchdog guarantees every future resolves
                yield fut.result()
        except KeyboardInterrupt:
            self.close()
            raise

    def run(self, requests: list[Request], progress: Progress | None = None) -> list[Result]:
        """Results in request order (like the sequential executor)."""
        by_id: dict[str, Result] = {}
        try:
            for res in self.stream(requests):
                by_id[res.id] = res
                if progress:
                    progress(res)
        except KeyboardInterrupt:  # also when raised by ``progress``, outside the generator
            self.close()
            raise
        return [by_id[r.id] for r in requests]

    def stats(self, wall_s: float) -> dict[str, Any]:
        return self.recorder.stats(wall_s)

    def write_trace(self, path: str | Path) -> Path:
        """Chrome trace JSON of the spans recorded since the last ``run`` began."""
        return self.recorder.write_trace(path)

    # ------------------------------------------------------------ requests
    def _submit(self, reqs: list[Request], flush: bool, on_done: Callable[[Any], None] | None = None) -> "list[Future[Result]]":
        """Register the requests (futures) and hand them to the batcher."""
        if not self._started:
            self.start()
        ids = [r.id for r in reqs]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique within a run")
        futures: list[Future[Result]] = []
        now = time.perf_counter()
        with self._lock:
            busy = [i for i in ids if i in self._reqs]
            if busy:
                raise ValueError(f"request id(s) already in flight: {busy[:5]}")
            for r in reqs:
                fut: Future[Result] = Future()
                if on_done is not None:
                    fut.add_done_callback(on_done)
                futures.append(fut)
                self._reqs[r.id] = _Live(r, fut, now, [0.0] * self.p, keep=on_done is not None)
        if self._broken or self.stop_event.is_set():
            self._fail_all({"type": "Stopped", "message": self._broken or "the pipeline is closed", "stage": None, "node": None})
            return futures
        self.batcher.submit(reqs, flush)
        return futures

    def is_live(self, rid: str) -> bool:
        return rid in self._reqs

    def add_time(self, items: list[ItemMeta], s: int, dt: float) -> None:
        """Charge a stage's time to every request it worked for (each stage writes its own slot)."""
        last = None
        for m in items:
            if m.request_id != last:
                rec = self._reqs.get(m.request_id)
                if rec is not None:
                    rec.stage_s[s] += dt
                last = m.request_id

    def fail(self, rids: Iterable[str], error: dict[str, Any]) -> None:
        """Resolve these requests with ``error`` (once; later results for them are dropped)."""
        for rid in dict.fromkeys(rids):
            with self._lock:
                rec = self._reqs.pop(rid, None)
            if rec is None:
                continue
            self.store.purge(rid)
            self._resolve(rec, Result(rec.req.id, rec.req.input, error=dict(error, requests=error.get("requests") or [rid])))

    def fail_node(self, err: NodeError) -> None:
        self.fail(err.request_ids, err.to_dict())

    def _fail_all(self, error: dict[str, Any]) -> None:
        with self._lock:
            rids = list(self._reqs)
        self.fail(rids, dict(error, requests=None))

    def _resolve(self, rec: _Live, res: Result) -> None:
        lat = time.perf_counter() - rec.t0
        res.timings = {"stages_s": {f"stage{i}": round(v, 6) for i, v in enumerate(rec.stage_s) if v}, "latency_s": round(lat, 6)}
        self.recorder.request_done(rec.req.id, rec.t0, res.ok)
        if rec.keep:
            self.completed.append(res)
        self.last_progress = time.monotonic()
        rec.future.set_result(res)

    # ------------------------------------------------------------ moving values
    def deliver(self, s: int, items: list[ItemMeta], values: dict[str, Any], mb: int) -> None:
        """Send what stage ``s`` produced to its consumers (packet, side store, or the collector)."""
        routes = self.routes.out[s]
        to_next: dict[str, Any] = {}
        stored: dict[int, dict[str, Any]] = {}
        for key, route in routes.items():
            if key not in values:
                continue
            v = values[key]
            if route.to_next:
                to_next[key] = v
            for c in route.store:
                stored.setdefault(c, {})[key] = v
        for c, vals in stored.items():
            moved, ev = self._move(s, c, vals, mb, len(items))
            self.store.put(c, items, moved, ev)
        if stored:
            for rid in {m.request_id for m in items}:
                if rid not in self._reqs:  # failed meanwhile: do not keep its values
                    self.store.purge(rid)
        if s + 1 == self.p:
            self._collect(items, to_next)
        else:
            moved, ev = self._move(s, s + 1, to_next, mb, len(items))
            self.inboxes[s + 1].put(Packet(items, moved, mb=mb, ready=ev))

    def _move(self, s: int, c: int, values: dict[str, Any], mb: int, n: int) -> tuple[dict[str, Any], Any]:
        src = "cpu" if s == INPUTS else self.plan.stages[s].device
        dst = self.plan.stages[c].device if c < self.p else src
        if src == dst or not values:
            return values, None
        mover = self._movers.get((s, dst))
        if mover is None:
            mover = self._movers[(s, dst)] = Mover(src, dst)
        t0 = time.perf_counter()
        out = mover.move(values)
        if s >= 0:
            self.recorder.logs[s].transfers.append((t0, time.perf_counter(), mb, n, f"to stage {c}"))
        return out

    def take_stored(self, s: int, items: list[ItemMeta], pop: bool) -> dict[str, Any]:
        """Values addressed to stage ``s`` for these items, ready to use on its device."""
        keys = self.routes.store_reads[s]
        if not keys:
            return {}
        vals, events = self.store.take(s, keys, items, pop)
        dev = self.plan.stages[s].device if s < self.p else "cpu"
        for ev in events:
            wait_ready(ev, dev)
        return vals

    def _collect(self, items: list[ItemMeta], values: dict[str, Any]) -> None:
        """Final rows of finished items; a request completes with its last item."""
        values = {**values, **self.take_stored(self.p, items, pop=True)}
        keys = [k for k in self.routes.final_keys if k in values]
        for i, m in enumerate(items):
            rec = self._reqs.get(m.request_id)
            if rec is None:
                continue
            rec.rows.append((m, {k: row(values[k], i) for k in keys}))
            if len(rec.rows) >= m.of:
                self._complete(m.request_id)

    def _complete(self, rid: str, empty: bool = False) -> None:
        with self._lock:
            rec = self._reqs.pop(rid, None)
        if rec is None:
            return
        self.store.purge(rid)
        try:
            if empty:  # an expanding node produced no items for it (e.g. empty audio)
                outputs = {name: _gather_empty(self.plan, key) for name, key in self.plan.outputs.items()}
            else:
                outputs = assemble(self.plan, rec.rows)[rid]
            res = Result(rid, rec.req.input, outputs=outputs)
        except Exception as exc:  # a gather hook failed: this request's error only
            res = Result(rid, rec.req.input, error={"type": type(exc).__name__, "message": str(exc), "stage": self.p, "node": "outputs", "requests": [rid]})
        self._resolve(rec, res)

    def complete_empty(self, rids: Iterable[str]) -> None:
        for rid in rids:
            self._complete(rid, empty=True)

    # ------------------------------------------------------------ supervision
    def stall(self, s: int, node: str, message: str, kind: str = "StageTimeout") -> None:
        """Stop the pipeline and fail every unfinished request with ``message``."""
        self._broken = message
        self.stop_event.set()
        self._fail_all({"type": kind, "message": message, "stage": s, "node": node})

    def stopping(self) -> bool:
        return self.stop_event.is_set()

    def in_flight(self) -> int:
        return len(self._reqs)

    def progress(self) -> None:
        """Something moved (the watchdog's no-progress clock restarts)."""
        self.last_progress = time.monotonic()


def _gather_empty(plan: Plan, key: str) -> Any:
    node, _, port = key.partition(".")
    return kind_class(plan, node).gather(port, []) if node in plan.nodes else []
