"""The request batching policy: which requests travel together, and when.

Requests wait in a bucket (one per length range) until the bucket holds
``max_batch_size`` of them or its oldest request has waited ``max_delay_ms``;
the batch then leaves, cut into micro-batches of ``microbatch_size``. The policy
is plain data and arithmetic on timestamps (no threads), so it is tested
directly; the pipeline's batcher thread drives it.

Lengths are generic: ``request.params["length"]`` when the source set it, else
whatever the ``length_of`` hook returns (by default the size of the largest
tensor input). The runtime never knows what a length means (seconds of audio,
tokens, pixels).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable

from mmpipe.graphs.base import Request

LengthFn = Callable[[Request], float]


def group_key(params: dict[str, Any], names: list[str]) -> tuple[str, ...]:
    """What must be equal for two requests (or items) to share a micro-batch."""
    return tuple(repr(params.get(n)) for n in names)


def default_length(req: Request) -> float:
    """``params["length"]`` if present, else the element count of the largest tensor value."""
    if "length" in req.params:
        return float(req.params["length"])
    best = 0.0
    for v in req.values.values():
        n = getattr(v, "numel", None)
        if callable(n):
            best = max(best, float(n()))
    return best


@dataclass
class _Bucket:
    requests: list[Request] = field(default_factory=list)
    lengths: list[float] = field(default_factory=list)
    since: float = 0.0  # arrival time of the oldest waiting request


class BatchPolicy:
    """Groups requests into micro-batches (lists of requests).

    ``add`` returns the micro-batches that became ready because a bucket
    filled; ``poll`` those whose delay ran out; ``flush`` everything left.
    """

    def __init__(self, max_batch_size: int, max_delay_ms: float, microbatch_size: int,
                 length_buckets: list[float] | None = None, length_of: LengthFn | None = None,
                 group_by: list[str] | None = None) -> None:
        """``group_by``: request parameters that must be equal within a micro-batch
        (requests with other values wait in buckets of their own)."""
        self.max_batch_size = max(1, int(max_batch_size))
        self.microbatch_size = max(1, min(int(microbatch_size), self.max_batch_size))
        self.max_delay_s = max(0.0, float(max_delay_ms)) / 1000.0
        self.bounds = sorted(float(b) for b in (length_buckets or []))
        self.length_of = length_of or default_length
        self.group_by = list(group_by or [])
        self.buckets: dict[Any, _Bucket] = {}

    @classmethod
    def from_plan(cls, plan: Any, length_of: LengthFn | None = None) -> "BatchPolicy":
        b, r = plan.batching, plan.runtime
        return cls(b.get("max_batch_size", 8), b.get("max_delay_ms", 5.0), r.get("microbatch_size", 1),
                   b.get("length_buckets") or [], length_of, b.get("group_by") or [])

    def bucket_of(self, length: float) -> int:
        """Index of the length range: bucket i holds bounds[i-1] < length <= bounds[i]."""
        return bisect.bisect_left(self.bounds, length)

    def add(self, req: Request, now: float) -> list[list[Request]]:
        length = self.length_of(req) if self.bounds else 0.0
        key = (self.bucket_of(length), group_key(req.params, self.group_by))
        b = self.buckets.get(key)
        if b is None:
            b = self.buckets[key] = _Bucket(since=now)
        b.requests.append(req)
        b.lengths.append(length)
        if len(b.requests) >= self.max_batch_size:
            return self._take(key)
        return []

    def poll(self, now: float) -> list[list[Request]]:
        """Micro-batches of every bucket whose oldest request waited ``max_delay_ms``."""
        out: list[list[Request]] = []
        for key in [k for k, b in self.buckets.items() if now - b.since >= self.max_delay_s]:
            out += self._take(key)
        return out

    def flush(self) -> list[list[Request]]:
        out: list[list[Request]] = []
        for key in sorted(self.buckets):
            out += self._take(key)
        return out

    def next_deadline(self) -> float | None:
        """When the oldest waiting bucket is due (None when nothing waits)."""
        if not self.buckets:
            return None
        return min(b.since for b in self.buckets.values()) + self.max_delay_s

    def pending(self) -> int:
        return sum(len(b.requests) for b in self.buckets.values())

    def _take(self, key: Any) -> list[list[Request]]:
        b = self.buckets.pop(key)
        reqs = b.requests
        if self.bounds:
            # Similar lengths together inside a bucket: less padding per micro-batch.
            order = sorted(range(len(reqs)), key=lambda i: b.lengths[i])
            reqs = [reqs[i] for i in order]
        n = self.microbatch_size
        return [reqs[i:i + n] for i in range(0, len(reqs), n)]
