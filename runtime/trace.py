"""Spans, statistics and the Chrome trace of a pipeline run.

Each stage worker appends its own spans (no lock: one writer per list). From
them ``Recorder.stats`` computes per-stage busy %, queue wait, the measured
bubble (idle share of the stages between the first span's start and the last
span's end) next to GPipe's (p-1)/(m+p-1), throughput and latency;
``Recorder.chrome_trace`` returns the JSON that chrome://tracing and Perfetto
open; ``format_stats`` prints the table ``mmpipe run`` shows.
"""
from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpipe.runtime.results import percentile

# (start, end, micro-batch id, items, name)
Span = tuple[float, float, int, int, str]
# A long-lived pipeline (``submit`` forever) keeps only the latest spans and latencies.
KEEP = 200_000


@dataclass
class StageLog:
    """What one stage did: compute spans, transfer spans it issued, queue waits."""

    spans: deque[Span] = field(default_factory=lambda: deque(maxlen=KEEP))
    transfers: deque[Span] = field(default_factory=lambda: deque(maxlen=KEEP))
    wait_sum: float = 0.0
    wait_max: float = 0.0
    waits: int = 0

    def queued(self, wait_s: float) -> None:
        self.wait_sum += wait_s
        self.waits += 1
        if wait_s > self.wait_max:
            self.wait_max = wait_s


class Recorder:
    """Collects spans per stage and per-request latencies; turns them into stats and traces."""

    def __init__(self, names: list[str], devices: list[str]) -> None:
        self.names, self.devices = names, devices
        self.reset()

    def reset(self) -> None:
        """Start a new measurement (stage logs are cleared in place: workers hold them)."""
        self.origin = time.perf_counter()
        if not hasattr(self, "logs"):
            self.logs = [StageLog() for _ in self.names]
        for log in self.logs:
            log.spans.clear()
            log.transfers.clear()
            log.wait_sum = log.wait_max = 0.0
            log.waits = 0
        self.latencies: deque[float] = deque(maxlen=KEEP)
        self.requests: deque[tuple[float, float, str, bool]] = deque(maxlen=KEEP)  # (submitted, done, id, ok)
        self.failed = 0
        self.microbatches = 0  # micro-batches the batcher formed
        self.loops: dict[str, dict[str, int]] = {}

    def request_done(self, rid: str, t0: float, ok: bool) -> None:
        t1 = time.perf_counter()
        self.requests.append((t0, t1, rid, ok))
        if ok:
            self.latencies.append(t1 - t0)
        else:
            self.failed += 1

    def loop_counter(self, node: str) -> dict[str, int]:
        return self.loops.setdefault(node, {"groups": 0, "joined_items": 0, "trips": 0, "retried_items": 0, "max_inflight": 0})

    # ------------------------------------------------------------ stats
    def stats(self, wall_s: float) -> dict[str, Any]:
        p = len(self.logs)
        spans = [s for log in self.logs for s in log.spans]
        start = min((s[0] for s in spans), default=0.0)
        end = max((s[1] for s in spans), default=0.0)
        window = max(end - start, 1e-12)
        stages = []
        busy_total = 0.0
        for i, log in enumerate(self.logs):
            busy = sum(s[1] - s[0] for s in log.spans)
            busy_total += busy
            stages.append({
                "stage": i, "runs": self.names[i], "device": self.devices[i],
                "busy_s": round(busy, 6), "busy_pct": round(100 * busy / wall_s, 2) if wall_s > 0 else 0.0,
                "calls": len(log.spans), "items": sum(s[3] for s in log.spans),
                "queue_wait_ms": round(1000 * log.wait_sum / log.waits, 3) if log.waits else 0.0,
                "queue_wait_max_ms": round(1000 * log.wait_max, 3),
                "transfer_s": round(sum(s[1] - s[0] for s in log.transfers), 6),
            })
        # m: micro-batches the batcher formed (stage-0 calls when driven another way)
        m = self.microbatches or (len(self.logs[0].spans) if p else 0)
        done = len(self.latencies) + self.failed
        return {
            "stages": stages,
            "microbatches": m,
            "bubble_pct": round(100 * (1 - busy_total / (p * window)), 2) if spans else None,
            "bubble_theory_pct": round(100 * (p - 1) / (m + p - 1), 2) if m else None,
            "throughput_rps": round(done / wall_s, 4) if wall_s > 0 else None,
            "latency_p50_s": round(percentile(list(self.latencies), 0.5), 6) if self.latencies else None,
            "latency_p95_s": round(percentile(list(self.latencies), 0.95), 6) if self.latencies else None,
            "loops": {k: dict(v) for k, v in self.loops.items()},
        }

    # ------------------------------------------------------------ trace
    def chrome_trace(self) -> dict[str, Any]:
        """Chrome trace events: a track per stage, one per stage's outgoing transfers, request latencies."""
        ev: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "mmpipe pipeline"}}]
        us = lambda t: round((t - self.origin) * 1e6, 3)  # noqa: E731
        for i, log in enumerate(self.logs):
            ev.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": i, "args": {"name": f"stage {i} @ {self.devices[i]}: {self.names[i]}"}})
            ev.append({"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": i, "args": {"sort_index": 2 * i}})
            for t0, t1, mb, n, name in log.spans:
                ev.append({"name": f"{name} mb{mb}", "cat": "compute", "ph": "X", "pid": 1, "tid": i, "ts": us(t0), "dur": round((t1 - t0) * 1e6, 3), "args": {"microbatch": mb, "items": n}})
            if log.transfers:
                tid = 1000 + i
                ev.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": f"transfers from stage {i}"}})
                ev.append({"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": tid, "args": {"sort_index": 2 * i + 1}})
                for t0, t1, mb, n, name in log.transfers:
                    ev.append({"name": f"{name} mb{mb}", "cat": "transfer", "ph": "X", "pid": 1, "tid": tid, "ts": us(t0), "dur": round((t1 - t0) * 1e6, 3), "args": {"microbatch": mb, "items": n}})
        for t0, t1, rid, ok in self.requests:  # request latency, as async spans on their own track
            args = {"ok": ok}
            ev.append({"name": f"request {rid}", "cat": "request", "ph": "b", "id": rid, "pid": 2, "ts": us(t0), "args": args})
            ev.append({"name": f"request {rid}", "cat": "request", "ph": "e", "id": rid, "pid": 2, "ts": us(t1), "args": args})
        if self.requests:
            ev.append({"name": "process_name", "ph": "M", "pid": 2, "args": {"name": "requests (submit -> result)"}})
        return {"traceEvents": ev, "displayTimeUnit": "ms"}

    def write_trace(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.chrome_trace()))
        return p


def format_stats(stats: dict[str, Any]) -> str:
    """A printable per-stage table plus bubble, throughput and latency lines."""
    rows = [("stage", "device", "busy %", "calls", "items", "queue wait ms", "runs")]
    for s in stats.get("stages", []):
        wait = f"{s.get('queue_wait_ms', 0):.2f} (max {s.get('queue_wait_max_ms', 0):.1f})" if "queue_wait_ms" in s else "-"
        rows.append((str(s["stage"]), str(s.get("device", "-")), f"{s.get('busy_pct', 0):.1f}", str(s.get("calls", "-")),
                     str(s.get("items", "-")), wait, str(s.get("runs", ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if stats.get("bubble_pct") is not None:
        p, m = len(stats.get("stages", [])), stats.get("microbatches", 0)
        theory = stats.get("bubble_theory_pct")
        lines.append(f"bubble: measured {stats['bubble_pct']:.1f}%, theory (p-1)/(m+p-1) = {theory:.1f}% (p={p}, m={m})" if theory is not None else f"bubble: measured {stats['bubble_pct']:.1f}%")
    for node, c in (stats.get("loops") or {}).items():
        lines.append(f"loop {node}: {c['groups']} groups, {c['trips']} trips, {c['joined_items']} items joined running groups, "
                     f"{c['max_inflight']} max in flight, {c['retried_items']} items retried alone")
    tput, p50, p95 = stats.get("throughput_rps"), stats.get("latency_p50_s"), stats.get("latency_p95_s")
    if tput is not None:
        lat = f"; latency p50 {p50:.4f} s, p95 {p95:.4f} s" if p50 is not None and p95 is not None else ""
        lines.append(f"throughput {tput:.2f} req/s{lat}")
    return "\n".join(lines)
