"""Pipelined loops with continuous batching.

A loop node's body is split over stages L0..Lk. A *group* (a micro-batch
circulating in the loop) passes L0..Lk, then ``end`` on Lk says which of its
items are done: those leave at once for the stage after the loop; the rest go
back to L0 on an unbounded lane. L0's inbox admits a new group from the
waiting micro-batches whenever fewer than ``max_inflight`` groups circulate
(default: one per body stage, at least 2), so every body stage has work; when
the loop is full, a returning group is topped up with waiting items to
``batching.max_batch_size`` (``begin``/``enter`` run only for the newcomers)
and finished items are replaced without waiting for the group to drain.

The first stage may also run a *prelude* (``nodes.X.with_previous``: the end of the
heavy node before the loop): items run it as they are admitted, right before
``begin``, so that stage's time is the prelude's plus its share of the steps. What
the prelude makes goes to the loop (in this stage) and, through side stores, to
every other consumer.

Lanes (per-item loop state: a KV cache, a scheduler step) stay on the stage
that owns them; each body stage detects newcomers by their missing lane (or a
lane of an earlier entry: every entry gets a number, carried in the packet) and
reads their side inputs from the side store. Lanes of items that leave are
freed by the owning thread; other threads, or other processes, only post the
request. A replicated loop node runs as independent copies; a group never
leaves its copy.

Failures: the failing group's items restart from ``begin`` one by one
(isolated groups); an item that fails alone fails its request.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any

from mmpipe.graphs.base import ItemMeta, LoopKind
from mmpipe.runtime.batch import MicroBatch, to_device
from mmpipe.runtime.channels import Packet, Stopped
from mmpipe.runtime.execute import LoopBody, NodeError, loop_exit, node_inputs, rows_to_batch, run_unit
from mmpipe.runtime.fabric import Fabric
from mmpipe.runtime.stage import StageWorker, WorkerSpec
from mmpipe.runtime.transfer import wait_ready

Finish = tuple[list[ItemMeta], list[int] | None]


class LoopLocal:
    """One copy of a loop node, as far as this process holds it (its local body stages)."""

    def __init__(self, fabric: Fabric, node: str, r: int, stages: list[int], bodies: dict[int, LoopBody]) -> None:
        self.fabric, self.node, self.r, self.stages = fabric, node, r, stages
        self.first, self.k = stages[0], len(stages) - 1
        self.bodies = bodies  # body index j -> the piece held here
        self.pending: dict[int, deque[Finish]] = {j: deque() for j in bodies}
        self.gens = itertools.count()  # entry numbers (first stage only)
        self.group_ids = itertools.count()  # first stage only

    def post_finish(self, j: int, items: list[ItemMeta], gens: list[int] | None) -> None:
        """Ask body stage ``j``'s thread to free these lanes (deque append: thread-safe)."""
        self.pending[j].append((list(items), list(gens) if gens is not None else None))
        self.fabric.inbox((self.stages[j], self.r)).wake()

    def drain(self, j: int) -> None:
        q = self.pending[j]
        while q:
            items, gens = q.popleft()
            self.bodies[j].finish(items, gens)

    def finish_everywhere(self, items: list[ItemMeta], gens: list[int] | None, here: int, keep_inputs: bool = False) -> None:
        """Items left the loop: free their lanes on every body stage and their side inputs.

        ``keep_inputs``: the items will enter again (a retry) and need their side inputs.
        """
        if not items:
            return
        for j in range(self.k + 1):
            if j == here:
                self.bodies[j].finish(items, gens)
            else:
                self.fabric.finish_lanes(self.node, self.r, j, items, gens)
        if not keep_inputs:
            for s in self.stages:
                self.fabric.release((s, self.r), items)


class LoopWorker(StageWorker):
    """The thread body of one loop body stage (index ``j`` of the loop's stages)."""

    def __init__(self, spec: WorkerSpec, loop: LoopLocal) -> None:
        super().__init__(spec)
        self.loop = loop
        self.j = loop.stages.index(self.s)
        self.body = loop.bodies[self.j]
        self.inst: LoopKind = self.body.inst
        self.counts = self.log.loop
        self.prelude = spec.units[:-1]  # as Stage.prelude: the units before the loop's piece (first stage only)
        self.running = loop.node  # the node a failure is reported against

    def run(self) -> None:
        try:
            self.enter_thread()
            idle = lambda: self.loop.drain(self.j)  # noqa: E731
            inbox = self.fabric.inbox(self.addr)
            while True:
                if self.j == 0:
                    adm = self.fabric.loop_inbox(self.addr).admit(lambda: next(self.loop.group_ids), idle)
                    self.log.queued(adm.waited)
                    if adm.started:
                        self.counts["groups"] += 1
                        self.counts["max_inflight"] = max(self.counts["max_inflight"], self.fabric.loop_inbox(self.addr).inflight)
                    elif adm.new:
                        self.counts["joined_items"] += len(adm.new)
                    pkt, new = adm.group, adm.new
                else:
                    pkt = inbox.get(idle=idle)
                    self.log.queued(time.perf_counter() - pkt.t_put)
                    new = []
                self.loop.drain(self.j)  # before touching lanes: a finished lane may be re-entered now
                inbox.busy = True
                try:
                    self.handle_group(pkt, new)
                finally:
                    inbox.busy = False
        except Stopped:
            pass
        except BaseException as exc:
            self.fabric.stall(self.s, self.loop.node, f"stage {self.s} worker crashed: {type(exc).__name__}: {exc}", kind="RuntimeError")

    def handle_group(self, pkt: Packet, new: list[ItemMeta]) -> None:
        fabric, loop, node = self.fabric, self.loop, self.loop.node
        wait_ready(pkt.ready, self.device)
        items, carry = pkt.items, pkt.carry
        gens = list(pkt.gens) if pkt.gens is not None else [-1] * len(items)
        if self.j == 0:
            keep = [i for i, m in enumerate(items) if fabric.is_live(m.request_id)]
            if len(keep) < len(items):  # their request failed elsewhere (a sibling item)
                drop = [i for i in range(len(items)) if i not in keep]
                loop.finish_everywhere([items[i] for i in drop], [gens[i] for i in drop], here=0)
                items, gens = [items[i] for i in keep], [gens[i] for i in keep]
                carry = self.inst.select(carry, keep) if keep and carry is not None else None
            new = [m for m in new if fabric.is_live(m.request_id)]
            new_gens = [next(loop.gens) for _ in new]
            if not items and not new:
                fabric.group_done(node, self.r)
                return
        else:
            fresh = [i for i, m in enumerate(items) if self.body.is_new(m, gens[i])]
            new, new_gens = [items[i] for i in fresh], [gens[i] for i in fresh]
        everyone, every_gen = (items + new, gens + new_gens) if self.j == 0 else (items, gens)  # what a failure must retry or fail
        t0 = time.perf_counter()
        self.slot.busy(node)
        try:
            if new:
                stored, events = fabric.take_stored(self.addr, new, pop=False)
                for ev in events:
                    wait_ready(ev, self.device)
                entering = self.run_prelude(MicroBatch(new, stored, id=pkt.group))
                x = node_inputs(self.plan, node, entering)
                self.body.enter(x, new, new_gens)
                if self.j == 0:
                    fresh_carry = self.inst.begin(to_device(x, self.device), new)
                    carry = fresh_carry if carry is None else self.inst.concat([carry, fresh_carry])
                    items, gens = items + new, gens + new_gens
            assert carry is not None, "a group reaches a body stage with its carry"
            carry = self.body.step(carry, items)
            done: list[bool] = []
            outs: dict[str, Any] = {}
            if self.j == loop.k:
                carry, done, outs = self.inst.end(carry, items, self.body.lanes_for(items))
        except Exception as exc:
            self.failed(everyone, every_gen, pkt.isolated, exc)
            return
        finally:
            self.slot.idle()
            t1 = time.perf_counter()
            self.log.spans.append((t0, t1, pkt.group, len(items), "step"))
            fabric.add_time(items, self.s, t1 - t0)
            fabric.progress()
        if self.j < loop.k:
            nxt = Packet(items, carry=carry, mb=pkt.group, group=pkt.group, isolated=pkt.isolated, gens=gens)
            self.out.to_stage(loop.stages[self.j + 1], nxt)
        else:
            self.after_end(pkt, items, gens, carry, done, outs)

    def run_prelude(self, mb: MicroBatch) -> MicroBatch:
        """Run the prelude's pieces on items entering the loop and send what they make to
        its other consumers; ``mb`` with those values, for the loop's inputs."""
        for u, inst in self.prelude:
            self.running = u.node
            self.slot.busy(u.node)  # a hang names the piece that hangs
            res = run_unit(self.plan, u, inst, mb, self.device)
            assert isinstance(res, MicroBatch), "a prelude never expands items (the compiler checks)"
            mb = res
        self.running = self.loop.node
        self.slot.busy(self.loop.node)
        if self.prelude:
            self.out.deliver_prelude(mb.items, mb.values, mb.id)
        return mb

    def after_end(self, pkt: Packet, items: list[ItemMeta], gens: list[int], carry: dict[str, Any], done: list[bool],
                  outs: dict[str, Any]) -> None:
        """Finished items leave the loop; the others go back to its first stage."""
        loop = self.loop
        self.counts["trips"] += 1
        done_rows = [i for i, d in enumerate(done) if d]
        keep = [i for i, d in enumerate(done) if not d]
        progress = outs.get("_progress")
        if progress is not None and keep:
            self.fabric.report([items[i] for i in keep], [progress[i] for i in keep])
        if keep:
            back = Packet([items[i] for i in keep], carry=self.inst.select(carry, keep), mb=pkt.group, group=pkt.group,
                          isolated=pkt.isolated, gens=[gens[i] for i in keep])
            self.out.to_stage(loop.first, back, back=True)
        else:
            self.fabric.group_done(loop.node, self.r)
        if not done_rows:
            return
        gone = [items[i] for i in done_rows]
        rows = loop_exit(self.plan, loop.node, items, outs, done_rows)
        out = rows_to_batch(self.plan, gone, [rows[i] for i in done_rows])
        loop.finish_everywhere(gone, [gens[i] for i in done_rows], here=self.j)
        out.id = pkt.group
        live = self.live_mb(out)
        if live is not None:
            self.out.deliver(live.items, live.values, pkt.group)

    def failed(self, items: list[ItemMeta], gens: list[int], isolated: bool, exc: Exception) -> None:
        """Retry the group's items alone from ``begin``; an item failing alone fails its request."""
        loop = self.loop
        rids = sorted({m.request_id for m in items})
        retry = not isolated and len(rids) > 1
        loop.finish_everywhere(items, gens, here=self.j, keep_inputs=retry)
        node, self.running = self.running, loop.node
        if not retry:
            self.fail_node(NodeError(self.s, node, rids, exc))
        else:
            self.counts["retried_items"] += len(items)
            for m in items:
                if self.fabric.is_live(m.request_id):
                    self.out.to_stage(loop.first, Packet([m], isolated=True), retry=True)
        self.fabric.group_done(loop.node, self.r)
