"""The helper threads: the batcher feeding stage 0 (driver), and the watchdog.

The batcher turns submitted requests into micro-batches (``BatchPolicy``),
collates their inputs and hands them on through its own ``Outlet`` (stage 0,
and the side stores of stages that read request inputs late); a request whose
inputs cannot be collated fails alone. The watchdog of each process stops the
run, naming the stage, when one of its node calls runs longer than
``runtime.timeout_s``; the driver's also when nothing at all moves for that long.
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Callable

from mmpipe.graphs.base import Request
from mmpipe.runtime.batch import from_requests
from mmpipe.runtime.batching import BatchPolicy, LengthFn
from mmpipe.runtime.channels import SLICE_S, Stopped
from mmpipe.runtime.deliver import Outlet
from mmpipe.runtime.execute import NodeError
from mmpipe.runtime.fabric import Fabric
from mmpipe.runtime.routing import INPUTS
from mmpipe.runtime.trace import Recorder

if TYPE_CHECKING:
    from mmpipe.runtime.stage import Slot, StageWorker


class Batcher:
    """Thread body: submitted requests -> micro-batches -> stage 0 (and the side stores)."""

    def __init__(self, fabric: Fabric, recorder: Recorder, length_of: LengthFn | None = None) -> None:
        self.fabric, self.recorder = fabric, recorder
        self.policy = BatchPolicy.from_plan(fabric.plan, length_of)
        self.out = Outlet(fabric, fabric.routes, INPUTS, 0, "cpu", None)
        self.pending: list[Request | None] = []  # None marks "flush now" (the end of a run's requests)
        self.cond = threading.Condition()

    def submit(self, reqs: list[Request], flush: bool) -> None:
        with self.cond:
            self.pending.extend(reqs)
            if flush:
                self.pending.append(None)
            self.cond.notify_all()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def run(self) -> None:
        fabric = self.fabric
        try:
            while not fabric.stopping():
                with self.cond:
                    if not self.pending:
                        due = self.policy.next_deadline()
                        wait = SLICE_S if due is None else max(0.0, min(SLICE_S, due - time.perf_counter()))
                        if wait > 0:
                            self.cond.wait(wait)
                    subs, self.pending = self.pending, []
                ready: list[list[Request]] = []
                for r in subs:
                    ready += self.policy.flush() if r is None else self.policy.add(r, time.perf_counter())
                ready += self.policy.poll(time.perf_counter())
                for group in ready:
                    self.send([r for r in group if fabric.is_live(r.id)])
        except Stopped:
            pass
        except BaseException as exc:  # a runtime bug must not hang the callers
            fabric.stall(INPUTS, "batcher", f"the batcher crashed: {type(exc).__name__}: {exc}", kind="RuntimeError")

    def send(self, reqs: list[Request]) -> None:
        """Collate and deliver one micro-batch; a malformed request fails alone."""
        if not reqs:
            return
        fabric = self.fabric
        try:
            mb = from_requests(fabric.plan, reqs, fabric.routes.input_keys)
        except Exception as exc:
            if len(reqs) > 1:
                for r in reqs:
                    self.send([r])
            else:
                err = NodeError(INPUTS, "inputs", [reqs[0].id], exc)
                fabric.fail(err.request_ids, err.to_dict())
            return
        self.recorder.microbatches += 1
        fabric.progress()
        self.out.deliver(mb.items, mb.values, mb.id)


class Watchdog:
    """Thread body: stops a stalled run with a message that names the stage."""

    def __init__(self, fabric: Fabric, workers: list["StageWorker"], in_flight: Callable[[], int] | None) -> None:
        """``in_flight``: the driver's count of unfinished requests (None elsewhere)."""
        self.fabric = fabric
        self.slots: list[tuple[int, "Slot"]] = [(w.s, w.slot) for w in workers]
        self.in_flight = in_flight
        self.limit = float(fabric.plan.runtime.get("timeout_s", 600))

    def run(self) -> None:
        fabric, plan, limit = self.fabric, self.fabric.plan, self.limit
        tick = min(0.1, limit / 10)
        while not fabric.stop_event.wait(tick):
            now = time.monotonic()
            for s, slot in self.slots:
                since = slot.since
                if since is not None and now - since > limit:
                    node = slot.node
                    fabric.stall(s, node, f"stage {s} ({plan.stage_label(plan.stages[s])}) made no progress for {limit:g} s "
                                          f"(runtime.timeout_s): node {node} did not return")
                    return
            if self.in_flight is not None and self.in_flight() and now - fabric.last_progress > limit:
                w = self.oldest_waiting()
                where = f"stage {w} ({plan.stage_label(plan.stages[w])})" if w is not None else "the pipeline"
                fabric.stall(INPUTS if w is None else w, "", f"{where} made no progress for {limit:g} s (runtime.timeout_s)")
                return

    def oldest_waiting(self) -> int | None:
        """The stage whose inbox holds the packet that has waited longest (in this process)."""
        waits = [(t, addr[0]) for addr, ib in self.fabric.inboxes.items() if (t := ib.oldest()) is not None]
        return min(waits)[1] if waits else None
