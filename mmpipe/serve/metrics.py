"""``GET /metrics``: Prometheus text for the served pipeline.

HTTP side (counted by a middleware): requests by route and status, latency histogram.
Pipeline side (read at scrape time from the runtime's worker logs, which every stage
worker appends to anyway; with ``runtime=distributed`` the other ranks send theirs, the
last ``WINDOW_S`` seconds only): per-stage-copy busy % over the last ``WINDOW_S`` seconds,
micro-batch sizes entering the first stage, items per loop step (loop group occupancy),
requests in flight and the admission limit. Worker logs are bounded deques written by
one worker each; a scrape only reads spans that ended after the previous scrape.
"""
from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

WINDOW_S = 60.0
SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The registry of one server (not the global one: tests start several)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mmpipe_http_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("mmpipe_http_request_seconds", "Time to answer (to the last byte of the body), by route", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("mmpipe_queue_depth", "Requests admitted and not yet answered", registry=r)
        self.in_flight = Gauge("mmpipe_pipeline_in_flight", "Requests inside the pipeline", registry=r)
        self.limit = Gauge("mmpipe_admission_limit", "At most this many requests are admitted (then 503)", registry=r)
        self.ready = Gauge("mmpipe_ready", "1 once the weights are loaded", registry=r)
        self.busy = Gauge("mmpipe_stage_busy_ratio", f"Share of the last {WINDOW_S:g} s each stage copy spent computing",
                          ["stage", "replica", "runs"], registry=r)
        self.mb = Histogram("mmpipe_microbatch_size", "Items per micro-batch entering the first stage", buckets=SIZE_BUCKETS, registry=r)
        self.loop = Histogram("mmpipe_loop_step_items", "Items per loop step (loop group occupancy)", ["loop"], buckets=SIZE_BUCKETS, registry=r)
        self._seen: dict[tuple[int, int], float] = {}  # (stage, replica) -> end time of the last span counted
        self._lock = threading.Lock()

    def observe_http(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text (pipeline gauges refreshed first)."""
        with self._lock:
            self._refresh()
        return generate_latest(self.registry)

    def _refresh(self) -> None:
        e = self.engine
        self.queue.set(e.active)
        self.in_flight.set(e.in_flight())
        self.limit.set(e.settings.max_queue)
        self.ready.set(1.0 if e.ready.is_set() else 0.0)
        pipe = e.pipe
        if pipe is None:
            return
        now = time.perf_counter()
        lo = now - WINDOW_S
        loops = {s: lp.node for lp in pipe.plan.loops for s in lp.stages}
        first_loop_stage = {lp.stages[-1] for lp in pipe.plan.loops}  # one count per step: its last body stage
        for wlog in pipe.recent_logs(lo):  # other ranks' too (distributed: fetched fresh)
            info = wlog.info
            spans = _copy(wlog.spans)
            busy = sum(max(0.0, min(b, now) - max(a, lo)) for a, b, *_ in spans if b > lo)
            self.busy.labels(str(info.stage), str(info.replica), info.runs).set(round(busy / WINDOW_S, 4))
            key = (info.stage, info.replica)
            seen = self._seen.get(key, float("-inf"))
            fresh = [s for s in spans if s[1] > seen]
            if fresh:
                self._seen[key] = max(s[1] for s in fresh)
            for _a, _b, _mb, n, name in fresh:
                if info.stage == 0 and name in ("compute", "chunk"):
                    self.mb.observe(n)
                if info.stage in first_loop_stage and name == "step":
                    self.loop.labels(loops[info.stage]).observe(n)


def _copy(spans: Any) -> list[Any]:
    """A snapshot of a worker's span deque (its worker may append meanwhile)."""
    for _ in range(5):
        try:
            return list(spans)
        except RuntimeError:  # mutated during the copy: try again
            continue
    return []
