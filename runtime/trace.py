"""Spans, statistics and the Chrome trace of a pipeline run.

Each stage worker (a copy of a stage, in some process) appends to its own
``WorkerLog`` (one writer per log, so no lock): compute spans, the transfers it
issued, queue waits and, for loop stages, loop counters. ``Recorder`` holds the
logs of one process plus, on the driver, request latencies; ``stats`` turns
the logs of every process into per-worker busy %, queue wait, the measured
bubble (idle share of the workers between the first span's start and the last
span's end) next to GPipe's (p-1)/(m+p-1), throughput and latency;
``chrome_trace`` gives the JSON chrome://tracing and Perfetto open (pid = rank).
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from mmpipe.runtime.results import percentile

# (start, end, micro-batch id, items, name)
Span = tuple[float, float, int, int, str]
# A long-lived pipeline (``submit`` forever) keeps only the latest spans and latencies.
KEEP = 200_000
LOOP_COUNTERS = ("groups", "joined_items", "trips", "retried_items", "max_inflight")


@dataclass
class WorkerInfo:
    """Which copy of which stage a worker runs, and where."""

    stage: int
    replica: int
    rank: int
    device: str
    runs: str
    loop: str | None = None
    threads: int = 0  # intra-op threads the worker ran with (written by the worker; 0: not known)


@dataclass
class WorkerLog:
    """What one worker did. Only that worker writes it."""

    info: WorkerInfo
    spans: deque[Span] = field(default_factory=lambda: deque(maxlen=KEEP))
    transfers: deque[Span] = field(default_factory=lambda: deque(maxlen=KEEP))
    wait_sum: float = 0.0
    wait_max: float = 0.0
    waits: int = 0
    loop: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LOOP_COUNTERS, 0))

    def queued(self, wait_s: float) -> None:
        self.wait_sum += wait_s
        self.waits += 1
        if wait_s > self.wait_max:
            self.wait_max = wait_s

    def clear(self) -> None:
        self.spans.clear()
        self.transfers.clear()
        self.wait_sum = self.wait_max = 0.0
        self.waits = 0
        for k in self.loop:  # in place: the worker holds this dict
            self.loop[k] = 0

    def export(self, offset: float = 0.0, since: float | None = None) -> dict[str, Any]:
        """Plain data (for another process); times shifted by ``offset`` onto the driver's clock.
        ``since`` (driver clock): only the spans that ended after it."""
        lo = -float("inf") if since is None else since - offset

        def shift(spans: deque[Span]) -> list[Span]:
            return [(a + offset, b + offset, mb, n, name) for a, b, mb, n, name in list(spans) if b > lo]

        return {"info": self.info.__dict__, "spans": shift(self.spans), "transfers": shift(self.transfers),
                "wait_sum": self.wait_sum, "wait_max": self.wait_max, "waits": self.waits, "loop": dict(self.loop)}

    @classmethod
    def load(cls, d: dict[str, Any]) -> "WorkerLog":
        log = cls(WorkerInfo(**d["info"]))
        log.spans.extend((a, b, mb, n, name) for a, b, mb, n, name in d["spans"])
        log.transfers.extend((a, b, mb, n, name) for a, b, mb, n, name in d["transfers"])
        log.wait_sum, log.wait_max, log.waits, log.loop = d["wait_sum"], d["wait_max"], d["waits"], dict(d["loop"])
        return log


class Recorder:
    """The worker logs of this process, plus request latencies on the driver."""

    def __init__(self, workers: list[WorkerInfo], num_stages: int) -> None:
        self.logs = [WorkerLog(w) for w in workers]
        self.num_stages = num_stages
        self.lock = threading.Lock()  # request latencies come from several threads
        self.remote: list[WorkerLog] = []  # other processes' logs, fetched for stats and traces
        self.ranks: dict[int, dict[str, Any]] = {}  # per rank: peak memory and such
        self.reset()

    def reset(self) -> None:
        """Start a new measurement (worker logs are cleared in place: workers hold them)."""
        self.origin = time.perf_counter()
        for log in self.logs:
            log.clear()
        self.remote = []
        with self.lock:
            self.latencies: deque[float] = deque(maxlen=KEEP)
            self.requests: deque[tuple[float, float, str, bool]] = deque(maxlen=KEEP)  # (submitted, done, id, ok)
            self.failed = 0
        self.microbatches = 0  # micro-batches the batcher formed (its thread only)

    def request_done(self, rid: str, t0: float, ok: bool) -> None:
        t1 = time.perf_counter()
        with self.lock:
            self.requests.append((t0, t1, rid, ok))
            if ok:
                self.latencies.append(t1 - t0)
            else:
                self.failed += 1

    def all_logs(self) -> list[WorkerLog]:
        return sorted(self.logs + self.remote, key=lambda g: (g.info.stage, g.info.replica))

    # ------------------------------------------------------------ stats
    def stats(self, wall_s: float) -> dict[str, Any]:
        logs = self.all_logs()
        spans = [s for log in logs for s in log.spans]
        start = min((s[0] for s in spans), default=0.0)
        end = max((s[1] for s in spans), default=0.0)
        window = max(end - start, 1e-12)
        stages = []
        busy_total = 0.0
        for log in logs:
            w = log.info
            busy = sum(s[1] - s[0] for s in log.spans)
            busy_total += busy
            stages.append({
                "stage": w.stage, "replica": w.replica, "rank": w.rank, "runs": w.runs, "device": w.device, "threads": w.threads,
                "busy_s": round(busy, 6), "busy_pct": round(100 * busy / wall_s, 2) if wall_s > 0 else 0.0,
                "calls": len(log.spans), "items": sum(s[3] for s in log.spans),
                "queue_wait_ms": round(1000 * log.wait_sum / log.waits, 3) if log.waits else 0.0,
                "queue_wait_max_ms": round(1000 * log.wait_max, 3),
                "transfer_s": round(sum(s[1] - s[0] for s in log.transfers), 6),
            })
        p = self.num_stages
        m = self.microbatches or (sum(len(g.spans) for g in logs if g.info.stage == 0))
        loops: dict[str, dict[str, int]] = {}
        for log in logs:
            if log.info.loop:
                agg = loops.setdefault(log.info.loop, dict.fromkeys(LOOP_COUNTERS, 0))
                for k, v in log.loop.items():
                    agg[k] = max(agg[k], v) if k == "max_inflight" else agg[k] + v
        with self.lock:
            lat, done = list(self.latencies), len(self.latencies) + self.failed
        out = {
            "stages": stages,
            "microbatches": m,
            "bubble_pct": round(100 * (1 - busy_total / (len(logs) * window)), 2) if spans else None,
            "bubble_theory_pct": round(100 * (p - 1) / (m + p - 1), 2) if m else None,
            "throughput_rps": round(done / wall_s, 4) if wall_s > 0 else None,
            "latency_p50_s": round(percentile(lat, 0.5), 6) if lat else None,
            "latency_p95_s": round(percentile(lat, 0.95), 6) if lat else None,
            "loops": loops,
        }
        if self.ranks:
            out["ranks"] = {str(k): v for k, v in sorted(self.ranks.items())}
        return out

    # ------------------------------------------------------------ trace
    def chrome_trace(self) -> dict[str, Any]:
        """Chrome trace events: a process per rank, a track per worker and one per its
        transfers, and request latencies on their own track."""
        def us(t: float) -> float:
            return round((t - self.origin) * 1e6, 3)

        ev: list[dict[str, Any]] = []
        ranks = sorted({g.info.rank for g in self.all_logs()} or {0})
        for rank in ranks:
            ev.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"mmpipe rank {rank}"}})
            ev.append({"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}})
        for log in self.all_logs():
            w = log.info
            tid = 100 * w.stage + w.replica
            copy = f" copy {w.replica}" if w.replica else ""
            ev.append({"name": "thread_name", "ph": "M", "pid": w.rank, "tid": tid, "args": {"name": f"stage {w.stage}{copy} @ {w.device}: {w.runs}"}})
            ev.append({"name": "thread_sort_index", "ph": "M", "pid": w.rank, "tid": tid, "args": {"sort_index": 2 * tid}})
            for t0, t1, mb, n, name in log.spans:
                ev.append({"name": f"{name} mb{mb}", "cat": "compute", "ph": "X", "pid": w.rank, "tid": tid, "ts": us(t0),
                           "dur": round((t1 - t0) * 1e6, 3), "args": {"microbatch": mb, "items": n, "stage": w.stage}})
            if log.transfers:
                xt = 100_000 + tid
                ev.append({"name": "thread_name", "ph": "M", "pid": w.rank, "tid": xt, "args": {"name": f"transfers from stage {w.stage}{copy}"}})
                ev.append({"name": "thread_sort_index", "ph": "M", "pid": w.rank, "tid": xt, "args": {"sort_index": 2 * tid + 1}})
                for t0, t1, mb, n, name in log.transfers:
                    ev.append({"name": f"{name} mb{mb}", "cat": "transfer", "ph": "X", "pid": w.rank, "tid": xt, "ts": us(t0),
                               "dur": round((t1 - t0) * 1e6, 3), "args": {"microbatch": mb, "items": n}})
        with self.lock:
            reqs = list(self.requests)
        req_pid = max(ranks) + 1
        for t0, t1, rid, ok in reqs:  # request latency, as async spans on their own track
            args = {"ok": ok}
            ev.append({"name": f"request {rid}", "cat": "request", "ph": "b", "id": rid, "pid": req_pid, "ts": us(t0), "args": args})
            ev.append({"name": f"request {rid}", "cat": "request", "ph": "e", "id": rid, "pid": req_pid, "ts": us(t1), "args": args})
        if reqs:
            ev.append({"name": "process_name", "ph": "M", "pid": req_pid, "args": {"name": "requests (submit -> result)"}})
        return {"traceEvents": ev, "displayTimeUnit": "ms"}

    def timeline(self) -> dict[str, Any]:
        """Plain data for a Gantt chart (``runtime/draw.py``): one row per worker with its spans
        ``[start, end, micro-batch or loop group, items, name]`` and transfers, in seconds from
        the first span's start."""
        logs = self.all_logs()
        t0 = min((s[0] for g in logs for s in g.spans), default=self.origin)

        def rel(spans: Iterable[Any]) -> list[list[Any]]:
            return [[a - t0, b - t0, mb, n, name] for a, b, mb, n, name in spans]

        rows = [{**g.info.__dict__, "spans": rel(g.spans), "transfers": rel(g.transfers)} for g in logs]
        end = max((s[1] for r in rows for s in r["spans"]), default=0.0)
        return {"rows": rows, "end": end, "stages": self.num_stages}

    def write_trace(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.chrome_trace()))
        return p


def format_stats(stats: dict[str, Any]) -> str:
    """A printable per-worker table plus bubble, throughput and latency lines."""
    multi = any(s.get("replica") for s in stats.get("stages", [])) or len({s.get("rank", 0) for s in stats.get("stages", [])}) > 1
    rows = [("stage", "device", "busy %", "calls", "items", "queue wait ms", "runs")]
    for s in stats.get("stages", []):
        wait = f"{s.get('queue_wait_ms', 0):.2f} (max {s.get('queue_wait_max_ms', 0):.1f})" if "queue_wait_ms" in s else "-"
        name = f"{s['stage']}" + (f" copy {s['replica']}" if s.get("replica") else "")
        dev = f"rank{s.get('rank', 0)}:{s.get('device', '-')}" if multi else str(s.get("device", "-"))
        rows.append((name, dev, f"{s.get('busy_pct', 0):.1f}", str(s.get("calls", "-")), str(s.get("items", "-")), wait, str(s.get("runs", ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if stats.get("bubble_pct") is not None:
        p = len({s["stage"] for s in stats.get("stages", [])})
        m, theory = stats.get("microbatches", 0), stats.get("bubble_theory_pct")
        lines.append(f"bubble: measured {stats['bubble_pct']:.1f}%, theory (p-1)/(m+p-1) = {theory:.1f}% (p={p}, m={m})" if theory is not None else f"bubble: measured {stats['bubble_pct']:.1f}%")
    for node, c in (stats.get("loops") or {}).items():
        lines.append(f"loop {node}: {c['groups']} groups, {c['trips']} trips, {c['joined_items']} items joined running groups, "
                     f"{c['max_inflight']} max in flight, {c['retried_items']} items retried alone")
    for rank, r in (stats.get("ranks") or {}).items():
        mem = f"peak RSS {r['peak_rss_mb']:.0f} MB" + (f", peak CUDA {r['peak_cuda_mb']:.0f} MB" if r.get("peak_cuda_mb") else "")
        lines.append(f"rank {rank} ({r.get('host', '?')}, {r.get('threads', '?')} threads): {mem}")
    tput, p50, p95 = stats.get("throughput_rps"), stats.get("latency_p50_s"), stats.get("latency_p95_s")
    if tput is not None:
        lat = f"; latency p50 {p50:.4f} s, p95 {p95:.4f} s" if p50 is not None and p95 is not None else ""
        lines.append(f"throughput {tput:.2f} req/s{lat}")
    return "\n".join(lines)
