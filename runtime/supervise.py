"""The pipeline's two helper threads: the batcher feeding stage 0, and the watchdog.

The batcher turns submitted requests into micro-batches (``BatchPolicy``),
collates their inputs and hands them to the first stage and the side store; a
request whose inputs cannot be collated fails alone. The watchdog fails every
unfinished request, naming the stage, when a node call runs longer than
``runtime.timeout_s`` or nothing at all moves for that long.
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from mmpipe.graphs.base import Request
from mmpipe.runtime.batch import from_requests
from mmpipe.runtime.batching import BatchPolicy
from mmpipe.runtime.channels import SLICE_S, Stopped
from mmpipe.runtime.execute import NodeError
from mmpipe.runtime.routing import INPUTS

if TYPE_CHECKING:
    from mmpipe.runtime.pipeline import Pipeline


class Batcher:
    """Thread body: submitted requests -> micro-batches -> stage 0 (and the side store)."""

    def __init__(self, pipe: "Pipeline") -> None:
        self.pipe = pipe
        self.policy = BatchPolicy.from_plan(pipe.plan, pipe.length_of)
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
        pipe = self.pipe
        try:
            while not pipe.stopping():
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
                    self.send([r for r in group if pipe.is_live(r.id)])
        except Stopped:
            pass
        except BaseException as exc:  # a runtime bug must not hang the callers
            pipe.stall(INPUTS, "batcher", f"the batcher crashed: {type(exc).__name__}: {exc}", kind="RuntimeError")

    def send(self, reqs: list[Request]) -> None:
        """Collate and deliver one micro-batch; a malformed request fails alone."""
        if not reqs:
            return
        pipe = self.pipe
        try:
            mb = from_requests(pipe.plan, reqs, pipe.routes.input_keys)
        except Exception as exc:
            if len(reqs) > 1:
                for r in reqs:
                    self.send([r])
            else:
                pipe.fail_node(NodeError(INPUTS, "inputs", [reqs[0].id], exc))
            return
        pipe.recorder.microbatches += 1
        pipe.progress()
        pipe.deliver(INPUTS, mb.items, mb.values, mb.id)


class Watchdog:
    """Thread body: stops a stalled run with a message that names the stage."""

    def __init__(self, pipe: "Pipeline") -> None:
        self.pipe = pipe

    def run(self) -> None:
        pipe, plan = self.pipe, self.pipe.plan
        limit = pipe.timeout_s
        tick = min(0.1, limit / 10)
        while not pipe.stop_event.wait(tick):
            now = time.monotonic()
            for s in range(pipe.p):
                since = pipe.busy_since[s]
                if since is not None and now - since > limit:
                    node = pipe.busy_node[s]
                    pipe.stall(s, node, f"stage {s} ({plan.stage_label(plan.stages[s])}) made no progress for {limit:g} s "
                                        f"(runtime.timeout_s): node {node} did not return")
                    return
            if pipe.in_flight() and now - pipe.last_progress > limit:
                s = self.oldest_waiting()
                where = f"stage {s} ({plan.stage_label(plan.stages[s])})" if s is not None else "the pipeline"
                pipe.stall(INPUTS if s is None else s, "", f"{where} made no progress for {limit:g} s (runtime.timeout_s)")
                return

    def oldest_waiting(self) -> int | None:
        """The stage whose inbox holds the packet that has waited longest."""
        waits = [(t, s) for s, ib in enumerate(self.pipe.inboxes) if (t := ib.oldest()) is not None]
        return min(waits)[1] if waits else None
