"""The driver's table of requests in flight, and per-request stage time.

``RequestTable`` owns its lock: it registers requests (with their futures),
says which are live, collects final rows, and resolves each request exactly
once, with outputs or an error. Stage workers never touch its fields; they call
``is_live``, ``fail``, ``collect`` and ``complete_empty`` (in another process
through the distributed link).

``TimeBook`` adds up the compute time each stage spent on each request; a
process that hands items to another process ships their times along.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from mmpipe.dsl.plan import Plan
from mmpipe.graphs.base import ItemMeta, Request
from mmpipe.runtime.batch import row
from mmpipe.runtime.results import Result, assemble

# time (s) per stage, by request id
Times = dict[str, dict[int, float]]


class TimeBook:
    """Compute time per request and stage; each add is under a lock (several workers)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.t: Times = {}

    def add(self, items: list[ItemMeta], s: int, dt: float) -> None:
        with self.lock:
            for rid in dict.fromkeys(m.request_id for m in items):
                per = self.t.setdefault(rid, {})
                per[s] = per.get(s, 0.0) + dt

    def take(self, rids: Iterable[str]) -> Times:
        """Remove and return what is booked for these requests (to ship it elsewhere)."""
        with self.lock:
            return {rid: t for rid in dict.fromkeys(rids) if (t := self.t.pop(rid, None))}

    def merge(self, times: Times) -> None:
        with self.lock:
            for rid, per in times.items():
                mine = self.t.setdefault(rid, {})
                for s, dt in per.items():
                    mine[s] = mine.get(s, 0.0) + dt

    def drop(self, rids: Iterable[str]) -> None:
        with self.lock:
            for rid in rids:
                self.t.pop(rid, None)


@dataclass
class _Live:
    """A request in flight: its future, start time and finished rows."""

    req: Request
    future: "Future[Result]"
    t0: float
    keep: bool  # submitted by run/stream: also kept in ``RequestTable.completed``
    rows: list[tuple[ItemMeta, dict[str, Any]]] = field(default_factory=list)
    total: int | None = None  # items of a streamed expansion, once its stream ended
    on_progress: Callable[[ItemMeta, Any], None] | None = None


class RequestTable:
    """Requests in flight on the driver (see the module docstring)."""

    def __init__(self, plan: Plan, times: TimeBook, on_resolved: Callable[[str, float, bool], None],
                 on_retired: Callable[[list[str], bool], None]) -> None:
        """``on_resolved(rid, t0, ok)``: for stats; ``on_retired(rids, failed)``: forget
        whatever is held for these requests (side stores, other processes)."""
        self.plan = plan
        self.times = times
        self.on_resolved, self.on_retired = on_resolved, on_retired
        self.lock = threading.Lock()
        self._live: dict[str, _Live] = {}
        # Results of the current run()/stream() as they finish: still there after Ctrl-C.
        self.completed: list[Result] = []
        self.last_progress = time.monotonic()

    # ------------------------------------------------------------ registering
    def add(self, reqs: list[Request], on_done: Callable[[Any], None] | None,
            on_progress: Callable[[ItemMeta, Any], None] | None = None) -> "list[Future[Result]]":
        ids = [r.id for r in reqs]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique within a run")
        now = time.perf_counter()
        futures: list[Future[Result]] = []
        with self.lock:
            busy = [i for i in ids if i in self._live]
            if busy:
                raise ValueError(f"request id(s) already in flight: {busy[:5]}")
            for r in reqs:
                fut: Future[Result] = Future()
                if on_done is not None:
                    fut.add_done_callback(on_done)
                futures.append(fut)
                self._live[r.id] = _Live(r, fut, now, keep=on_done is not None, on_progress=on_progress)
        return futures

    def is_live(self, rid: str) -> bool:
        return rid in self._live

    def in_flight(self) -> int:
        return len(self._live)

    def idle(self) -> bool:
        return not self._live

    def reset_completed(self) -> None:
        with self.lock:
            self.completed = []

    def progress(self) -> None:
        """Something moved (the watchdog's no-progress clock restarts)."""
        self.last_progress = time.monotonic()

    # ------------------------------------------------------------ finishing
    def fail(self, rids: Iterable[str], error: dict[str, Any]) -> None:
        """Resolve these requests with ``error`` (once; later results for them are dropped)."""
        gone: list[_Live] = []
        for rid in dict.fromkeys(rids):
            with self.lock:
                rec = self._live.pop(rid, None)
            if rec is not None:
                gone.append(rec)
        times = self._retire([rec.req.id for rec in gone], True) if gone else {}
        for rec in gone:
            self._resolve(rec, Result(rec.req.id, rec.req.input, error=dict(error, requests=error.get("requests") or [rec.req.id])),
                          times.get(rec.req.id, {}))

    def fail_all(self, error: dict[str, Any]) -> None:
        with self.lock:
            rids = list(self._live)
        self.fail(rids, dict(error, requests=None))

    def collect(self, items: list[ItemMeta], values: dict[str, Any]) -> None:
        """Final rows of finished items; a request completes with its last item."""
        keys = [k for k in dict.fromkeys(self.plan.outputs.values()) if k in values]
        done = []
        with self.lock:
            for i, m in enumerate(items):
                rec = self._live.get(m.request_id)
                if rec is None:
                    continue
                rec.rows.append((m, {k: row(values[k], i) for k in keys}))
                need = m.of if m.of else rec.total  # of=0: a streamed item, count announced later
                if need is not None and len(rec.rows) >= need:
                    done.append(m.request_id)
        for rid in done:
            self._complete(rid)

    def expect(self, counts: dict[str, int]) -> None:
        """A streamed expansion ended: each request's item count (0: it made none)."""
        done, empty = [], []
        with self.lock:
            for rid, n in counts.items():
                rec = self._live.get(rid)
                if rec is None:
                    continue
                rec.total = n
                if n == 0:
                    empty.append(rid)
                elif len(rec.rows) >= n:
                    done.append(rid)
        for rid in done:
            self._complete(rid)
        self.complete_empty(empty)

    def report(self, items: list[ItemMeta], progress: list[Any]) -> None:
        """Partial progress of unfinished items, to their requests' ``on_progress`` (a
        failing callback is the caller's problem, never the pipeline's)."""
        for m, p in zip(items, progress):
            rec = self._live.get(m.request_id)
            if rec is not None and rec.on_progress is not None:
                try:
                    rec.on_progress(m, p)
                except Exception:
                    pass

    def complete_empty(self, rids: Iterable[str]) -> None:
        """An expanding node produced no items for these requests (e.g. empty audio)."""
        for rid in rids:
            self._complete(rid, empty=True)

    def _complete(self, rid: str, empty: bool = False) -> None:
        with self.lock:
            rec = self._live.pop(rid, None)
        if rec is None:
            return
        try:
            if empty:
                outputs = {name: _gather_empty(self.plan, key) for name, key in self.plan.outputs.items()}
            else:
                outputs = assemble(self.plan, rec.rows)[rid]
            res = Result(rid, rec.req.input, outputs=outputs)
        except Exception as exc:  # a gather hook failed: this request's error only
            res = Result(rid, rec.req.input, error={"type": type(exc).__name__, "message": str(exc), "stage": self.plan.num_stages,
                                                    "node": "outputs", "requests": [rid]})
        self._resolve(rec, res, self._retire([rid], False).get(rid, {}))

    def _retire(self, rids: list[str], failed: bool) -> Times:
        """Forget what is held for these requests before anyone sees them resolved (a caller
        then finds nothing held for them); their booked stage times, taken first."""
        times = self.times.take(rids)
        self.on_retired(rids, failed)
        return times

    def _resolve(self, rec: _Live, res: Result, per: dict[int, float]) -> None:
        lat = time.perf_counter() - rec.t0
        res.timings = {"stages_s": {f"stage{s}": round(v, 6) for s, v in sorted(per.items()) if v}, "latency_s": round(lat, 6)}
        self.on_resolved(rec.req.id, rec.t0, res.ok)
        if rec.keep:
            with self.lock:
                self.completed.append(res)
        self.progress()
        rec.future.set_result(res)


def _gather_empty(plan: Plan, key: str) -> Any:
    from mmpipe.runtime.nodes import kind_class

    node, _, port = key.partition(".")
    return kind_class(plan, node).gather(port, []) if node in plan.nodes else []
