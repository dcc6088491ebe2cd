"""Pipelined loops with continuous batching.

A loop node's body is split over stages L0..Lk. A *group* (a micro-batch
circulating in the loop) passes L0..Lk, then ``end`` on Lk says which of its
items are done: those leave at once for the stage after the loop; the rest go
back to L0 on an unbounded lane. The first stage admits a new group from the
waiting micro-batches whenever fewer than ``max_inflight`` groups circulate
(default: one per body stage, at least 2), so every body stage has work; when
the loop is full, a returning group is topped up with waiting items to
``batching.max_batch_size`` (``begin``/``enter`` run only for the newcomers)
and finished items are replaced without waiting for the group to drain.

Lanes (per-item loop state: a KV cache, a scheduler step) stay on the stage
that owns them; each body stage detects newcomers by their missing lane and
reads their side inputs from the side store. Lanes of items that leave are
freed by the owning thread (other threads only post the request).

Failures: the failing group's items restart from ``begin`` one by one
(isolated groups); an item that fails alone fails its request.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from mmpipe.graphs.base import ItemMeta, LoopKind
from mmpipe.runtime.batch import MicroBatch, to_device
from mmpipe.runtime.channels import SLICE_S, Packet, Stopped
from mmpipe.runtime.execute import LoopBody, NodeError, loop_exit, node_inputs, rows_to_batch
from mmpipe.runtime.stage import StageWorker
from mmpipe.runtime.transfer import bind_cuda_device, wait_ready

if TYPE_CHECKING:
    from mmpipe.runtime.pipeline import Pipeline


class LoopNode:
    """State shared by the body stages of one loop node."""

    def __init__(self, pipe: "Pipeline", node: str, stages: list[int]) -> None:
        self.pipe, self.node, self.stages = pipe, node, stages
        self.first, self.k = stages[0], len(stages) - 1
        mi = int(pipe.plan.runtime.get("max_inflight", 0))
        self.max_inflight = mi if mi > 0 else max(2, len(stages))
        self.inflight = 0  # groups inside the loop; guarded by the first stage's inbox lock
        plan = pipe.plan
        self.bodies = [LoopBody(plan.stages[s].units[0], pipe.insts[(node, plan.stages[s].units[0].piece)], plan.stages[s].device)  # type: ignore[arg-type]
                       for s in stages]
        self.pending_finish: list[deque[list[ItemMeta]]] = [deque() for _ in stages]
        self.group_ids = itertools.count()

    def counter(self) -> dict[str, int]:
        return self.pipe.recorder.loop_counter(self.node)

    def finish_everywhere(self, items: list[ItemMeta], here: int, keep_inputs: bool = False) -> None:
        """Items left the loop: free their lanes (by each owner thread) and side inputs.

        ``keep_inputs``: the items will enter again (a retry) and need their side inputs.
        """
        if not items:
            return
        for j, body in enumerate(self.bodies):
            if j == here:
                body.finish(items)
            else:
                self.pending_finish[j].append(list(items))
        if not keep_inputs:
            for s in self.stages:
                self.pipe.store.release(s, items)

    def drain(self, j: int) -> None:
        q = self.pending_finish[j]
        while q:
            self.bodies[j].finish(q.popleft())

    def group_done(self) -> None:
        ib = self.pipe.inboxes[self.first]
        with ib.cond:
            self.inflight -= 1
            ib.cond.notify_all()

    def admit(self) -> tuple[Packet, list[ItemMeta]]:
        """Next work for L0: (group packet, newcomers appended to it).

        Order: retried items and waiting micro-batches start new groups while
        the loop has room; otherwise a returning group, topped up with waiting
        items (continuous batching).
        """
        pipe = self.pipe
        ib = pipe.inboxes[self.first]
        log = pipe.recorder.logs[self.first]
        while True:
            with ib.cond:
                if pipe.stopping():
                    raise Stopped()
                room = self.inflight < self.max_inflight
                if room and (ib.retry or ib.main):
                    pkt = ib.retry.popleft() if ib.retry else ib.main.popleft()
                    self.inflight += 1
                    c = self.counter()
                    c["groups"] += 1
                    c["max_inflight"] = max(c["max_inflight"], self.inflight)
                    log.queued(time.perf_counter() - pkt.t_put)
                    ib.cond.notify_all()  # room in main for the stage before the loop
                    group = Packet([], mb=next(self.group_ids), isolated=pkt.isolated)
                    group.group = group.mb
                    return group, list(pkt.items)
                if ib.back:
                    pkt = ib.back.popleft()
                    log.queued(time.perf_counter() - pkt.t_put)
                    new: list[ItemMeta] = []
                    if not pkt.isolated:
                        space = pipe.max_batch - len(pkt.items)
                        while space > 0 and ib.main:
                            head = ib.main[0]
                            take, rest = head.items[:space], head.items[space:]
                            new += take
                            space -= len(take)
                            if rest:
                                head.items = rest
                            else:
                                ib.main.popleft()
                        if new:
                            self.counter()["joined_items"] += len(new)
                            ib.cond.notify_all()
                    return pkt, new
                woke = ib.cond.wait(SLICE_S)
            if not woke:
                self.drain(0)  # idle: free lanes of items that left (outside the lock)


class LoopWorker(StageWorker):
    """The thread body of one loop body stage (index ``j`` of the loop's stages)."""

    def __init__(self, pipe: "Pipeline", s: int, loop: LoopNode) -> None:
        super().__init__(pipe, s)
        self.loop = loop
        self.j = loop.stages.index(s)
        self.body = loop.bodies[self.j]
        self.inst: LoopKind = self.body.inst

    def run(self) -> None:
        try:
            bind_cuda_device(self.device)
            while True:
                if self.j == 0:
                    pkt, new = self.loop.admit()
                else:
                    pkt = self.pipe.inboxes[self.s].get(idle=lambda: self.loop.drain(self.j))
                    self.log.queued(time.perf_counter() - pkt.t_put)
                    new = []
                self.loop.drain(self.j)  # before touching lanes: a finished lane may be re-entered now
                self.handle_group(pkt, new)
        except Stopped:
            pass
        except BaseException as exc:
            self.pipe.stall(self.s, self.loop.node, f"stage {self.s} worker crashed: {type(exc).__name__}: {exc}", kind="RuntimeError")

    def handle_group(self, pkt: Packet, new: list[ItemMeta]) -> None:
        pipe, loop, node = self.pipe, self.loop, self.loop.node
        wait_ready(pkt.ready, self.device)
        items, carry = pkt.items, pkt.carry
        if self.j == 0:
            keep = [i for i, m in enumerate(items) if pipe.is_live(m.request_id)]
            if len(keep) < len(items):  # their request failed elsewhere (a sibling item)
                loop.finish_everywhere([items[i] for i in range(len(items)) if i not in keep], here=0)
                items = [items[i] for i in keep]
                carry = self.inst.select(carry, keep) if keep and carry is not None else None
            new = [m for m in new if pipe.is_live(m.request_id)]
            if not items and not new:
                loop.group_done()
                return
        else:
            new = [m for m in items if m.key not in self.body.lanes]
        everyone = items + new if self.j == 0 else items  # what a failure must retry or fail
        t0 = time.perf_counter()
        pipe.busy_node[self.s] = node
        pipe.busy_since[self.s] = time.monotonic()
        try:
            if new:
                x = node_inputs(pipe.plan, node, MicroBatch(new, pipe.take_stored(self.s, new, pop=False)))
                self.body.enter(x, new)
                if self.j == 0:
                    fresh = self.inst.begin(to_device(x, self.device), new)
                    carry = fresh if carry is None else self.inst.concat([carry, fresh])
                    items = items + new
            carry = self.body.step(carry, items)
            done: list[bool] = []
            outs: dict[str, Any] = {}
            if self.j == loop.k:
                carry, done, outs = self.inst.end(carry, items, self.body.lanes_for(items))
        except Exception as exc:
            self.failed(everyone, pkt.isolated, exc)
            return
        finally:
            pipe.busy_since[self.s] = None
            t1 = time.perf_counter()
            self.log.spans.append((t0, t1, pkt.group, len(items), "step"))
            pipe.add_time(items, self.s, t1 - t0)
            pipe.progress()
        if self.j < loop.k:
            nxt = loop.stages[self.j + 1]
            moved, ev = pipe._move(self.s, nxt, {"carry": carry}, pkt.group, len(items))
            pipe.inboxes[nxt].put(Packet(items, carry=moved["carry"], mb=pkt.group, group=pkt.group, isolated=pkt.isolated, ready=ev))
        else:
            self.after_end(pkt, items, carry, done, outs)

    def after_end(self, pkt: Packet, items: list[ItemMeta], carry: dict[str, Any], done: list[bool], outs: dict[str, Any]) -> None:
        """Finished items leave the loop; the others go back to its first stage."""
        pipe, loop = self.pipe, self.loop
        loop.counter()["trips"] += 1
        done_rows = [i for i, d in enumerate(done) if d]
        keep = [i for i, d in enumerate(done) if not d]
        if keep:
            back = self.inst.select(carry, keep)
            moved, ev = pipe._move(self.s, loop.first, {"carry": back}, pkt.group, len(keep))
            pipe.inboxes[loop.first].put_back(Packet([items[i] for i in keep], carry=moved["carry"], mb=pkt.group,
                                                     group=pkt.group, isolated=pkt.isolated, ready=ev))
        else:
            loop.group_done()
        if not done_rows:
            return
        gone = [items[i] for i in done_rows]
        rows = loop_exit(pipe.plan, loop.node, items, outs, done_rows)
        out = rows_to_batch(pipe.plan, gone, [rows[i] for i in done_rows])
        loop.finish_everywhere(gone, here=self.j)
        out.id = pkt.group
        live = self.live_mb(out)
        if live is not None:
            pipe.deliver(self.s, live.items, live.values, pkt.group)

    def failed(self, items: list[ItemMeta], isolated: bool, exc: Exception) -> None:
        """Retry the group's items alone from ``begin``; an item failing alone fails its request."""
        pipe, loop = self.pipe, self.loop
        rids = sorted({m.request_id for m in items})
        retry = not isolated and len(rids) > 1
        loop.finish_everywhere(items, here=self.j, keep_inputs=retry)
        if not retry:
            pipe.fail_node(NodeError(self.s, loop.node, rids, exc))
        else:
            loop.counter()["retried_items"] += len(items)
            first = pipe.inboxes[loop.first]
            for m in items:
                if pipe.is_live(m.request_id):
                    first.put_back(Packet([m], isolated=True), retry=True)
        loop.group_done()
