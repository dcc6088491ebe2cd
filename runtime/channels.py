"""How values reach a stage worker: packets, inboxes and the side store.

An ``Inbox`` is one stage copy's input: a bounded FIFO (back-pressure). A
``LoopInbox`` (the first stage of a loop body) adds unbounded lanes for items
coming back around the loop and for items being retried, and owns the loop's
admission: how many groups circulate at once. Every blocking call waits in
short slices and gives up when the pipeline stops, so no wait is unbounded.

The ``SideStore`` holds values for a stage that is not the producer's next
stage (an encoder output read by every decoder stage, a request input read
late): the producer puts them once, addressed to each consumer, and they never
travel through the queues of the stages in between. Values are stored as the
producer's batched tensors and gathered per item key, so micro-batches may be
regrouped (loops) or expanded (one audio file -> several windows) on the way.
Producers put an entry for every routed key, ``MISSING`` when they made none, so
a consumer can wait for values still on their way from another process.
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


class _Missing:
    """A routed value its producer did not make (an optional output)."""

    def __repr__(self) -> str:
        return "MISSING"

    def __reduce__(self) -> str:  # one object across processes too
        return "MISSING"


MISSING = _Missing()


@dataclass
class Packet:
    """What a stage hands to the next: items, their values, and loop state.

    Loop packets (``group >= 0``) never carry values: a loop body reads its inputs
    from the side store, so an item can leave one group and join another.
    """

    items: list[ItemMeta]
    values: dict[str, Any] = field(default_factory=dict)
    mb: int = 0  # micro-batch id (for traces)
    carry: dict[str, Any] | None = None  # loop carry between body stages
    group: int = -1  # loop group id (a micro-batch circulating in a loop)
    isolated: bool = False  # a loop group retried alone to find a failing item
    gens: list[int] | None = None  # loop entry number per item (tells a stale lane from a new one)
    ready: Any = None  # transfer event to wait on before reading values (CUDA)
    t_put: float = 0.0
    on_take: Callable[[], None] | None = None  # called once when taken (credit back to a remote sender)

    def __post_init__(self) -> None:
        if self.group >= 0 and self.values:
            raise AssertionError("a loop packet must not carry values (loop bodies read the side store)")
        if self.gens is not None and len(self.gens) != len(self.items):
            raise AssertionError("one entry number per item")

    def taken(self) -> None:
        if self.on_take is not None:
            cb, self.on_take = self.on_take, None
            cb()


class Inbox:
    """A stage copy's input: ``main`` is bounded (back-pressure)."""

    def __init__(self, depth: int, stopped: Callable[[], bool]) -> None:
        self.depth = max(1, depth)
        self.main: deque[Packet] = deque()
        self.cond = threading.Condition()
        self.stopped = stopped
        self.busy = False  # its worker is computing (read for least-loaded choices)

    def put(self, pkt: Packet) -> None:
        """Append to ``main``, waiting while it is full (back-pressure)."""
        with self.cond:
            while len(self.main) >= self.depth:
                if self.stopped():
                    raise Stopped()
                self.cond.wait(SLICE_S)
            self._append(self.main, pkt)

    def put_nowait(self, pkt: Packet) -> None:
        """Append to ``main`` at once: the sender holds a credit for it (another process)."""
        with self.cond:
            self._append(self.main, pkt)

    def _append(self, q: deque[Packet], pkt: Packet) -> None:
        pkt.t_put = time.perf_counter()
        q.append(pkt)
        self.cond.notify_all()

    def get(self, idle: Callable[[], None] | None = None) -> Packet:
        """The next packet; ``idle`` runs (outside the lock) after each empty wait slice."""
        while True:
            with self.cond:
                pkt = self._pop()
                if pkt is not None:
                    self.cond.notify_all()  # a producer may wait for room
                    break
                if self.stopped():
                    raise Stopped()
                woke = self.cond.wait(SLICE_S)
            if not woke and idle is not None:
                idle()
        pkt.taken()
        return pkt

    def _pop(self) -> Packet | None:
        return self.main.popleft() if self.main else None

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def oldest(self) -> float | None:
        """``t_put`` of the oldest waiting packet (for the watchdog)."""
        ts = [q[0].t_put for q in self._queues() if q]
        return min(ts) if ts else None

    def _queues(self) -> tuple[deque[Packet], ...]:
        return (self.main,)

    def load(self) -> int:
        """Waiting packets plus the one being computed (least-loaded dispatch)."""
        return len(self) + int(self.busy)

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues())


@dataclass
class Admission:
    """What ``LoopInbox.admit`` hands the loop's first stage."""

    group: Packet  # a new (empty) group or one coming back around the loop
    new: list[ItemMeta]  # waiting items that enter now
    started: bool  # a new group
    waited: float  # how long the packet taken had waited


class LoopInbox(Inbox):
    """The first loop stage's input: ``main`` (bounded) plus ``back`` and ``retry``.

    Only items already inside the loop use the unbounded lanes, and admission
    caps how many groups circulate (``max_inflight``), so nothing grows without
    bound and the loop's cycle of queues cannot deadlock on full buffers. The
    in-flight count is owned here, under this inbox's lock.
    """

    def __init__(self, depth: int, stopped: Callable[[], bool], max_inflight: int, max_batch: int,
                 key: Callable[[ItemMeta], Any] = lambda m: None) -> None:
        """``key``: what items must share to join one group (request parameters the math
        cannot mix, e.g. an image size)."""
        super().__init__(depth, stopped)
        self.back: deque[Packet] = deque()
        self.retry: deque[Packet] = deque()
        self.max_inflight, self.max_batch = max_inflight, max_batch
        self.key = key
        self.inflight = 0

    def put_back(self, pkt: Packet, retry: bool = False) -> None:
        """Append to an unbounded lane (never blocks)."""
        with self.cond:
            self._append(self.retry if retry else self.back, pkt)

    def _queues(self) -> tuple[deque[Packet], ...]:
        return (self.main, self.back, self.retry)

    def group_done(self) -> None:
        """A group left the loop for good: room for another."""
        with self.cond:
            if self.inflight <= 0:
                raise AssertionError("loop admission count went negative")
            self.inflight -= 1
            self.cond.notify_all()

    def admit(self, group_id: Callable[[], int], idle: Callable[[], None]) -> Admission:
        """Next work: retried items and waiting micro-batches start new groups while the
        loop has room; otherwise a returning group, topped up with waiting items to
        ``max_batch`` (continuous batching). Blocks until there is work."""
        taken: list[Packet] = []
        try:
            while True:
                with self.cond:
                    if self.stopped():
                        raise Stopped()
                    if self.inflight < self.max_inflight and (self.retry or self.main):
                        pkt = self.retry.popleft() if self.retry else self.main.popleft()
                        taken.append(pkt)
                        self.inflight += 1
                        self.cond.notify_all()  # room in main for the stage before the loop
                        gid = group_id()
                        group = Packet([], mb=gid, group=gid, isolated=pkt.isolated, gens=[])
                        return Admission(group, list(pkt.items), True, time.perf_counter() - pkt.t_put)
                    if self.back:
                        pkt = self.back.popleft()
                        new: list[ItemMeta] = []
                        if not pkt.isolated and pkt.items:
                            new = self._top_up(self.max_batch - len(pkt.items), taken, self.key(pkt.items[0]))
                        return Admission(pkt, new, False, time.perf_counter() - pkt.t_put)
                    woke = self.cond.wait(SLICE_S)
                if not woke:
                    idle()
        finally:
            for p in taken:
                p.taken()

    def _top_up(self, space: int, taken: list[Packet], key: Any) -> list[ItemMeta]:
        new: list[ItemMeta] = []
        while space > 0 and self.main and self.main[0].items and self.key(self.main[0].items[0]) == key:
            head = self.main[0]
            take, rest = head.items[:space], head.items[space:]
            new += take
            space -= len(take)
            if rest:
                head.items = rest
            else:
                taken.append(self.main.popleft())
        if new:
            self.cond.notify_all()
        return new


class SideStore:
    """Values addressed to one consumer (a stage copy, or the collector), by item key.

    ``put`` stores a producer's batched values once; ``take`` returns the rows
    of the given items batched together (the stored tensor itself when the
    items are exactly the stored micro-batch). An expanded item ``rid#k`` finds
    the rows of its parent ``rid`` stored before the expansion.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        # value key -> item key -> (batched value, row, transfer event)
        self.rows: dict[str, dict[str, tuple[Any, int, Any]]] = {}
        self.by_request: dict[str, set[tuple[str, str]]] = {}

    def put(self, items: list[ItemMeta], values: dict[str, Any], ready: Any = None) -> None:
        with self.cond:
            for vk, v in values.items():
                slot = self.rows.setdefault(vk, {})
                for i, m in enumerate(items):
                    slot[m.key] = (v, i, ready)
                    self.by_request.setdefault(m.request_id, set()).add((vk, m.key))
            self.cond.notify_all()

    def take(self, keys: list[str], items: list[ItemMeta], pop: bool, wait_s: float = 0.0,
             stopped: Callable[[], bool] = lambda: False) -> tuple[dict[str, Any], list[Any]]:
        """Batched values of ``keys`` for ``items`` and the transfer events to wait on.

        Waits up to ``wait_s`` for entries still on their way (another process).
        A key whose entries are all ``MISSING`` is left out (an optional input).
        """
        deadline = time.monotonic() + wait_s
        with self.cond:
            while True:
                found = {vk: [self._find(vk, m) for m in items] for vk in keys}
                absent = [(vk, m.key) for vk, hits in found.items() for m, h in zip(items, hits) if h is None]
                if not absent:
                    break
                left = deadline - time.monotonic()
                if left <= 0 or stopped():
                    if stopped():
                        raise Stopped()
                    raise KeyError(f"values never arrived: {absent[:4]}")
                self.cond.wait(min(left, SLICE_S))
            out: dict[str, Any] = {}
            events: dict[int, Any] = {}
            for vk, hits in found.items():
                if pop:
                    for m in items:
                        self._drop(vk, m)
                present = [h[0] is not MISSING for h in hits]  # type: ignore[index]
                if not any(present):
                    continue
                if not all(present):
                    missing = [m.key for m, p in zip(items, present) if not p]
                    raise KeyError(f"value {vk} missing for items {missing}")
                out[vk] = _gather(hits)  # type: ignore[arg-type]
                events.update({id(h[2]): h[2] for h in hits if h[2] is not None})  # type: ignore[index]
        return out, list(events.values())

    def _find(self, vk: str, m: ItemMeta) -> tuple[Any, int, Any] | None:
        slot = self.rows.get(vk)
        if slot is None:
            return None
        hit = slot.get(m.key)
        if hit is None and m.key != m.request_id:
            hit = slot.get(m.request_id)  # stored before the item was expanded
        return hit

    def _drop(self, vk: str, m: ItemMeta) -> None:
        slot = self.rows.get(vk)
        if slot is not None and slot.pop(m.key, None) is not None:
            self.by_request.get(m.request_id, set()).discard((vk, m.key))

    def release(self, items: list[ItemMeta]) -> None:
        """Forget what is held for these exact item keys."""
        with self.cond:
            for vk in list(self.rows):
                for m in items:
                    self._drop(vk, m)

    def purge(self, request_id: str) -> None:
        """Forget everything stored for a request (finished or failed)."""
        with self.cond:
            for vk, key in self.by_request.pop(request_id, ()):
                slot = self.rows.get(vk)
                if slot is not None:
                    slot.pop(key, None)

    def clear(self) -> None:
        with self.cond:
            self.rows.clear()
            self.by_request.clear()

    def size(self) -> int:
        with self.cond:
            return sum(len(s) for s in self.rows.values())


def _gather(found: list[tuple[Any, int, Any]]) -> Any:
    """Batch rows ``(batched value, row, event)``: runs from one value are sliced together."""
    first = found[0][0]
    if all(h[0] is first for h in found) and [h[1] for h in found] == list(range(len(found))) and batch_len(first) == len(found):
        return first  # the very micro-batch that was stored: no copy
    runs: list[tuple[Any, list[int]]] = []
    for v, r, _ in found:
        if runs and runs[-1][0] is v:
            runs[-1][1].append(r)
        else:
            runs.append((v, [r]))
    parts = [select_rows(v, rows) for v, rows in runs]
    return parts[0] if len(parts) == 1 else concat_rows(parts)


def batch_len(v: Any) -> int:
    """Rows of a batched value (-1 when it has none)."""
    if isinstance(v, dict):
        return batch_len(next(iter(v.values()))) if v else 0
    if isinstance(v, tuple):
        return batch_len(v[0]) if v else 0
    if isinstance(v, list):
        return len(v)
    shape = getattr(v, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) else -1
