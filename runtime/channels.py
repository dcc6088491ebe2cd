"""How values move between stage workers: inboxes and the side store.

An ``Inbox`` is a stage's input: a bounded FIFO (back-pressure) plus, for the
first stage of a loop body, unbounded lanes for items coming back around the
loop and for items being retried. Every blocking call waits in short slices and
gives up when the pipeline stops, so no wait is unbounded.

The ``SideStore`` holds values for stages that are not the producer's next
stage (an encoder output read by every decoder stage, a request input read
late): the producer puts them once, addressed to each consumer stage, and they
never travel through the queues of the stages in between. Values are stored as
the producer's batched tensors and gathered per item key, so micro-batches may
be regrouped (loops) or expanded (one audio file -> several windows) on the way.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from mmpipe.graphs.base import ItemMeta, concat_rows, select_rows

SLICE_S = 0.05  # longest single wait before re-checking the stop flag


class Stopped(Exception):
    """The pipeline is stopping: the waiting worker should exit."""


@dataclass
class Packet:
    """What a stage hands to the next: items, their values, and loop state."""

    items: list[ItemMeta]
    values: dict[str, Any] = field(default_factory=dict)
    mb: int = 0  # micro-batch id (for traces)
    carry: dict[str, Any] | None = None  # loop carry between body stages
    group: int = -1  # loop group id (a micro-batch circulating in a loop)
    isolated: bool = False  # a loop group retried alone to find a failing item
    ready: Any = None  # transfer event to wait on before reading values (CUDA)
    t_put: float = 0.0


class Inbox:
    """A stage's input: ``main`` is bounded, ``back``/``retry`` are not.

    Only items already inside a loop use the unbounded lanes; their number is
    capped by loop admission (``max_inflight``), so nothing grows without bound
    and the loop's cycle of queues cannot deadlock on full buffers.
    """

    def __init__(self, depth: int, stopped: Callable[[], bool]) -> None:
        self.depth = max(1, depth)
        self.main: deque[Packet] = deque()
        self.back: deque[Packet] = deque()
        self.retry: deque[Packet] = deque()
        self.cond = threading.Condition()
        self.stopped = stopped

    def put(self, pkt: Packet) -> None:
        """Append to ``main``, waiting while it is full (back-pressure)."""
        with self.cond:
            while len(self.main) >= self.depth:
                if self.stopped():
                    raise Stopped()
                self.cond.wait(SLICE_S)
            pkt.t_put = time.perf_counter()
            self.main.append(pkt)
            self.cond.notify_all()

    def put_back(self, pkt: Packet, retry: bool = False) -> None:
        """Append to an unbounded lane (never blocks)."""
        with self.cond:
            pkt.t_put = time.perf_counter()
            (self.retry if retry else self.back).append(pkt)
            self.cond.notify_all()

    def get(self, idle: Callable[[], None] | None = None) -> Packet:
        """The next packet of ``main`` or ``back`` (``back`` first).

        ``idle`` runs (outside the lock) after each wait slice that brought nothing.
        """
        while True:
            with self.cond:
                if self.back or self.main:
                    pkt = self.back.popleft() if self.back else self.main.popleft()
                    self.cond.notify_all()  # a producer may wait for room
                    return pkt
                if self.stopped():
                    raise Stopped()
                woke = self.cond.wait(SLICE_S)
            if not woke and idle is not None:
                idle()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def oldest(self) -> float | None:
        """``t_put`` of the oldest waiting packet (for the watchdog)."""
        ts = [q[0].t_put for q in (self.main, self.back, self.retry) if q]
        return min(ts) if ts else None

    def __len__(self) -> int:
        return len(self.main) + len(self.back) + len(self.retry)


class SideStore:
    """Values addressed to one consumer stage, gathered by item key.

    ``put`` stores a producer's batched values once; ``take`` returns the rows
    of the given items batched together (the stored tensor itself when the
    items are exactly the stored micro-batch). An expanded item ``rid#k`` finds
    the rows of its parent ``rid`` stored before the expansion.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # (stage, value key) -> item key -> (batched value, row, transfer event)
        self.rows: dict[tuple[int, str], dict[str, tuple[Any, int, Any]]] = {}
        self.by_request: dict[str, set[tuple[int, str, str]]] = {}

    def put(self, stage: int, items: list[ItemMeta], values: dict[str, Any], ready: Any = None) -> None:
        with self.lock:
            for vk, v in values.items():
                slot = self.rows.setdefault((stage, vk), {})
                for i, m in enumerate(items):
                    slot[m.key] = (v, i, ready)
                    self.by_request.setdefault(m.request_id, set()).add((stage, vk, m.key))

    def take(self, stage: int, keys: list[str], items: list[ItemMeta], pop: bool) -> tuple[dict[str, Any], list[Any]]:
        """Batched values of ``keys`` for ``items`` and the transfer events to wait on.

        A key stored for none of the items is left out (an optional input).
        """
        out: dict[str, Any] = {}
        events: list[Any] = []
        with self.lock:
            for vk in keys:
                slot = self.rows.get((stage, vk))
                if not slot:
                    continue
                found = []
                for m in items:
                    hit = slot.get(m.key)
                    if hit is None and m.key != m.request_id:
                        hit = slot.get(m.request_id)  # stored before the item was expanded
                    elif hit is not None and pop:
                        del slot[m.key]
                        self.by_request.get(m.request_id, set()).discard((stage, vk, m.key))
                    found.append(hit)
                if any(h is None for h in found):
                    if all(h is None for h in found):
                        continue
                    missing = [m.key for m, h in zip(items, found) if h is None]
                    raise KeyError(f"value {vk} for stage {stage} missing for items {missing}")
                out[vk] = _gather(found)  # type: ignore[arg-type]
                events += {id(h[2]): h[2] for h in found if h[2] is not None}.values()  # type: ignore[index]
        return out, events

    def release(self, stage: int, items: list[ItemMeta]) -> None:
        """Forget what ``stage`` holds for these exact item keys."""
        with self.lock:
            for (st, vk), slot in self.rows.items():
                if st != stage:
                    continue
                for m in items:
                    if slot.pop(m.key, None) is not None:
                        self.by_request.get(m.request_id, set()).discard((st, vk, m.key))

    def purge(self, request_id: str) -> None:
        """Forget everything stored for a request (finished or failed)."""
        with self.lock:
            for st, vk, key in self.by_request.pop(request_id, ()):
                slot = self.rows.get((st, vk))
                if slot is not None:
                    slot.pop(key, None)

    def clear(self) -> None:
        with self.lock:
            self.rows.clear()
            self.by_request.clear()

    def size(self) -> int:
        with self.lock:
            return sum(len(s) for s in self.rows.values())


def _gather(found: list[tuple[Any, int, Any]]) -> Any:
    """Batch rows ``(batched value, row, event)``: runs from one value are sliced together."""
    first = found[0][0]
    if all(h[0] is first for h in found) and [h[1] for h in found] == list(range(len(found))) and _batch_len(first) == len(found):
        return first  # the very micro-batch that was stored: no copy
    runs: list[tuple[Any, list[int]]] = []
    for v, r, _ in found:
        if runs and runs[-1][0] is v:
            runs[-1][1].append(r)
        else:
            runs.append((v, [r]))
    parts = [select_rows(v, rows) for v, rows in runs]
    return parts[0] if len(parts) == 1 else concat_rows(parts)


def _batch_len(v: Any) -> int:
    if isinstance(v, dict):
        return _batch_len(next(iter(v.values()))) if v else 0
    if isinstance(v, tuple):
        return _batch_len(v[0]) if v else 0
    if isinstance(v, list):
        return len(v)
    shape = getattr(v, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) else -1
