"""A stage worker: take a packet, run the stage's node pieces, hand the result on.

A node error fails only the requests it touched: the micro-batch is retried
item by item from the values it arrived with, so one bad item does not take
its neighbours down.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from mmpipe.graphs.base import select_rows
from mmpipe.runtime.batch import MicroBatch
from mmpipe.runtime.channels import Packet, Stopped
from mmpipe.runtime.execute import NodeError, run_unit
from mmpipe.runtime.transfer import bind_cuda_device, wait_ready

if TYPE_CHECKING:
    from mmpipe.runtime.pipeline import Pipeline


class StageWorker:
    """The thread body of a (non-loop) stage."""

    def __init__(self, pipe: "Pipeline", s: int) -> None:
        self.pipe, self.s = pipe, s
        self.stage = pipe.plan.stages[s]
        self.device = self.stage.device
        self.units = [(u, pipe.insts[(u.node, u.piece)]) for u in self.stage.units]
        self.log = pipe.recorder.logs[s]

    def run(self) -> None:
        """Serve the inbox until the pipeline stops."""
        try:
            bind_cuda_device(self.device)  # this thread's current stream is on our GPU
            while True:
                self.handle(self.pipe.inboxes[self.s].get())
        except Stopped:
            pass
        except BaseException as exc:  # a runtime bug: fail loudly but never hang the callers
            self.pipe.stall(self.s, "", f"stage {self.s} worker crashed: {type(exc).__name__}: {exc}", kind="RuntimeError")

    def live(self, pkt: Packet) -> Packet | None:
        """The packet without items whose request already failed (None if none is left)."""
        items = pkt.items
        keep = [i for i, m in enumerate(items) if self.pipe.is_live(m.request_id)]
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
        stored = self.pipe.take_stored(self.s, live.items, pop=True)
        if stored:
            values = {**values, **stored}
        mb = MicroBatch(live.items, values, id=live.mb)
        t0 = time.perf_counter()
        out = self.compute(mb)
        t1 = time.perf_counter()
        self.log.spans.append((t0, t1, mb.id, len(mb.items), "compute"))
        self.pipe.add_time(mb.items, self.s, t1 - t0)
        self.pipe.progress()
        if out is None:
            return
        if self.pipe.routes.expands[self.s]:
            gone = {m.request_id for m in mb.items} - {m.request_id for m in out.items}
            if gone:
                self.pipe.complete_empty(gone)
            if not out.items:
                return
        out = self.live_mb(out)
        if out is not None:
            self.pipe.deliver(self.s, out.items, out.values, mb.id)

    def live_mb(self, mb: MicroBatch) -> MicroBatch | None:
        keep = [i for i, m in enumerate(mb.items) if self.pipe.is_live(m.request_id)]
        if len(keep) == len(mb.items):
            return mb
        return mb.select(keep) if keep else None

    # ------------------------------------------------------------ compute
    def run_units(self, mb: MicroBatch) -> MicroBatch:
        """Every piece of this stage on ``mb``; a failure raises NodeError."""
        for unit, inst in self.units:
            self.pipe.busy_node[self.s] = unit.node
            self.pipe.busy_since[self.s] = time.monotonic()
            try:
                mb = run_unit(self.pipe.plan, unit, inst, mb, self.device)
            except Exception as exc:
                raise NodeError(self.s, unit.node, sorted({m.request_id for m in mb.items}), exc) from exc
            finally:
                self.pipe.busy_since[self.s] = None
        return mb

    def compute(self, mb: MicroBatch) -> MicroBatch | None:
        """``run_units``, isolating failing items by retrying them one at a time."""
        before: dict[str, Any] = dict(mb.values)  # run_unit pops/adds keys, never edits values
        try:
            return self.run_units(mb)
        except NodeError as err:
            if len(mb.items) == 1:
                self.pipe.fail_node(err)
                return None
        good = []
        for i, m in enumerate(mb.items):
            if not self.pipe.is_live(m.request_id):
                continue  # a sibling item of the same request already failed
            one = MicroBatch([m], {k: select_rows(v, [i]) for k, v in before.items()}, id=mb.id)
            try:
                good.append(self.run_units(one))
            except NodeError as err:
                self.pipe.fail_node(err)
        good = [g for g in good if g.items and self.pipe.is_live(g.items[0].request_id)]
        if not good:
            return None
        out = MicroBatch.join(good)
        out.id = mb.id
        return out
