"""A stage worker: take a packet, run the stage's node pieces, hand the result on.

A worker runs one copy of one stage. It sees only what it needs: its inbox,
its ``Outlet`` (sending side), the ``Fabric`` (liveness, failures, other
copies by address), its own log and busy slot. A node error fails only the
requests it touched: the micro-batch is retried in halves from the values it
arrived with, down to single items, so one bad item (or one batch too big for
memory) does not take its neighbours down.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from mmpipe.dsl.plan import Unit
from mmpipe.graphs.base import NodeKind, select_rows
from mmpipe.runtime.batch import MicroBatch
from mmpipe.runtime.channels import Packet, Stopped
from mmpipe.runtime.deliver import Outlet
from mmpipe.runtime.execute import NodeError, Stream, run_unit
from mmpipe.runtime.fabric import Addr, Fabric
from mmpipe.runtime.trace import WorkerLog
from mmpipe.runtime.transfer import bind_cuda_device, wait_ready


class Slot:
    """A worker's busy state, for the watchdog (written by that worker only)."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.node = ""

    def busy(self, node: str) -> None:
        self.node, self.since = node, time.monotonic()

    def idle(self) -> None:
        self.since = None


@dataclass
class WorkerSpec:
    """Everything a worker is given (instead of the pipeline object)."""

    fabric: Fabric
    addr: Addr
    device: str
    units: list[tuple[Unit, NodeKind]]
    outlet: Outlet
    log: WorkerLog
    slot: Slot
    threads: int = 0  # intra-op threads of this worker (0: the process's)
    started: threading.Event = field(default_factory=threading.Event)  # set once the worker set its threads


def use_threads(n: int) -> int:
    """Give the calling thread ``n`` intra-op threads (0: keep its count); the count it now has.

    torch keeps the count per thread (OpenMP and MKL settings are per thread), but a
    thread's first parallel op resets it to the process-wide value: ``get_num_threads``
    runs that set-up first. ``set_num_threads`` also changes the process-wide value that
    threads set up later start with; the caller restores it (``Core.start``)."""
    have = torch.get_num_threads()
    if n > 0 and n != have:
        torch.set_num_threads(n)
        have = torch.get_num_threads()
    return have


class StageWorker:
    """The thread body of one copy of a (non-loop) stage."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.fabric, self.addr, self.device = spec.fabric, spec.addr, spec.device
        self.s, self.r = spec.addr
        self.plan = spec.fabric.plan
        self.units, self.out, self.log, self.slot = spec.units, spec.outlet, spec.log, spec.slot
        self.expands = self.fabric.routes.expands[self.s]

    def run(self) -> None:
        """Serve the inbox until the pipeline stops."""
        try:
            self.enter_thread()
            self.serve()
        except Stopped:
            pass
        except BaseException as exc:  # a runtime bug: fail loudly but never hang the callers
            self.fabric.stall(self.s, "", f"stage {self.s} worker crashed: {type(exc).__name__}: {exc}", kind="RuntimeError")

    def enter_thread(self) -> None:
        """First thing in the worker's thread: its GPU and its intra-op threads."""
        try:
            bind_cuda_device(self.device)  # this thread's current stream is on our GPU
            self.log.info.threads = use_threads(self.spec.threads)
        finally:
            self.spec.started.set()

    def serve(self) -> None:
        """Take packets from the inbox and handle them, one at a time."""
        inbox = self.fabric.inbox(self.addr)
        while True:
            pkt = inbox.get()
            inbox.busy = True
            try:
                self.handle(pkt)
            finally:
                inbox.busy = False

    def live(self, pkt: Packet) -> Packet | None:
        """The packet without items whose request already failed (None if none is left)."""
        items = pkt.items
        keep = [i for i, m in enumerate(items) if self.fabric.is_live(m.request_id)]
        if len(keep) == len(items):
            return pkt
        if not keep:
            return None
        pkt.items = [items[i] for i in keep]
        pkt.values = {k: select_rows(v, keep) for k, v in pkt.values.items()}
        return pkt

    def handle(self, pkt: Packet) -> None:
        self.log.queued(time.perf_counter() - pkt.t_put)
        live = self.live(pkt)
        if live is None:
            return
        wait_ready(live.ready, self.device)
        values = live.values
        stored, events = self.fabric.take_stored(self.addr, live.items, pop=True)
        for ev in events:
            wait_ready(ev, self.device)
        if stored:
            values = {**values, **stored}
        mb = MicroBatch(live.items, values, id=live.mb)
        t0 = time.perf_counter()
        out = self.compute(mb)
        t1 = time.perf_counter()
        self.log.spans.append((t0, t1, mb.id, len(mb.items), "compute"))
        self.fabric.add_time(mb.items, self.s, t1 - t0)
        self.fabric.progress()
        if isinstance(out, Chunks):
            self.stream(mb, out)
            return
        if out is None:
            return
        if self.expands:
            gone = {m.request_id for m in mb.items} - {m.request_id for m in out.items}
            if gone:
                self.fabric.complete_empty(gone)
            if not out.items:
                return
        out = self.live_mb(out)
        if out is not None:
            self.out.deliver(out.items, out.values, mb.id)

    def stream(self, mb: MicroBatch, chunks: "Chunks") -> None:
        """Hand on each chunk of a streamed expansion as it is made (back-pressure keeps the
        rest unmade), then announce each request's item count. A failure mid-stream fails
        the requests of the micro-batch: what they already handed on cannot be taken back."""
        it = iter(chunks)
        while True:
            t0 = time.perf_counter()
            try:
                chunk = next(it)
            except StopIteration:
                break
            except NodeError as err:
                self.fail_node(NodeError(err.stage, err.node, sorted({m.request_id for m in mb.items}), err.cause))
                return
            t1 = time.perf_counter()
            self.log.spans.append((t0, t1, mb.id, len(chunk.items), "chunk"))
            self.fabric.add_time(chunk.items, self.s, t1 - t0)
            self.fabric.progress()
            live = self.live_mb(chunk)
            if live is not None:
                self.out.deliver(live.items, live.values, mb.id)
        for counts in chunks.counts:
            self.fabric.expect(counts)

    def live_mb(self, mb: MicroBatch) -> MicroBatch | None:
        keep = [i for i, m in enumerate(mb.items) if self.fabric.is_live(m.request_id)]
        if len(keep) == len(mb.items):
            return mb
        return mb.select(keep) if keep else None

    # ------------------------------------------------------------ compute
    def run_units(self, mb: MicroBatch, start: int = 0) -> "MicroBatch | Chunks":
        """Every piece of this stage on ``mb`` (from unit ``start``); a failure raises
        NodeError. A streaming expansion makes ``Chunks``: the rest runs per chunk."""
        for idx in range(start, len(self.units)):
            unit, inst = self.units[idx]
            self.slot.busy(unit.node)
            try:
                res = run_unit(self.plan, unit, inst, mb, self.device)
            except Exception as exc:
                raise NodeError(self.s, unit.node, sorted({m.request_id for m in mb.items}), exc) from exc
            finally:
                self.slot.idle()
            if isinstance(res, Stream):
                return Chunks(self, res, idx + 1)
            mb = res
        return mb

    def fail_node(self, err: NodeError) -> None:
        self.fabric.fail(err.request_ids, err.to_dict())

    def compute(self, mb: MicroBatch) -> "MicroBatch | Chunks | None":
        """``run_units``; a failing micro-batch is retried in halves (smaller micro-batches, as
        after running out of memory) down to single items, and an item that fails alone
        fails its request, so one bad item does not take its neighbours down."""
        before: dict[str, Any] = dict(mb.values)  # run_unit pops/adds keys, never edits values
        try:
            return self.run_units(mb)  # Chunks: made lazily, no retry in halves (see stream)
        except NodeError as err:
            if len(mb.items) == 1:
                self.fail_node(err)
                return None
            free_memory(err.cause)
        half = len(mb.items) // 2
        good = [g for rows in (list(range(half)), list(range(half, len(mb.items))))
                if (g := self._retry(mb, before, rows)) is not None]
        good = [g for g in good if g.items]
        if not good:
            return None
        out = MicroBatch.join(good)
        out.id = mb.id
        return out

    def _retry(self, mb: MicroBatch, before: dict[str, Any], rows: list[int]) -> MicroBatch | None:
        live = [i for i in rows if self.fabric.is_live(mb.items[i].request_id)]  # a sibling item may have failed
        if not live:
            return None
        part = MicroBatch([mb.items[i] for i in live], {k: select_rows(v, live) for k, v in before.items()}, id=mb.id)
        out = self.compute(part)
        if isinstance(out, Chunks):
            self.stream(part, out)  # a retried part that streams hands its chunks on itself
            return None
        return self.live_mb(out) if out is not None else None


class Chunks:
    """A stage's output made one chunk at a time: each chunk of a streaming expansion,
    through the stage's remaining pieces. ``counts`` gets each stream's per-request item
    counts once it is exhausted."""

    def __init__(self, worker: StageWorker, stream: Stream, rest: int) -> None:
        self.worker, self.stream, self.rest = worker, stream, rest
        self.counts: list[dict[str, int]] = []

    def __iter__(self) -> Iterator[MicroBatch]:
        w, node = self.worker, self.stream.node
        rids = sorted({m.request_id for m in self.stream.mb.items})
        it = iter(self.stream)
        while True:
            w.slot.busy(node)
            try:
                chunk = next(it)
            except StopIteration:
                break
            except Exception as exc:
                raise NodeError(w.s, node, rids, exc) from exc
            finally:
                w.slot.idle()
            out = w.run_units(chunk, self.rest)
            if isinstance(out, Chunks):
                raise NodeError(w.s, out.stream.node, rids, ValueError("a streamed item cannot be expanded again"))
            yield out
        assert self.stream.counts is not None
        self.counts.append(self.stream.counts)


def free_memory(cause: BaseException) -> None:
    """After running out of memory, give the cached blocks back before the smaller retries."""
    if isinstance(cause, MemoryError) or type(cause).__name__ == "OutOfMemoryError":
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass
