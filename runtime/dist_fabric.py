"""The fabric of one rank: local addresses as in one process, the rest over the ``Link``.

Workers call the same ``Fabric`` methods in every backend. Here each call
addressed to a stage copy on another rank becomes a message; the receiving
rank's ``on_message`` performs it on its own local fabric. What the messages
carry besides values: the compute time booked for the items' requests (so
the driver can report per-stage time), the replica choices made for them
(later producers must follow them), and, for bounded inboxes, a credit that
comes back when the packet leaves the inbox (back-pressure across processes).

Only rank 0 (the driver) holds the request table. Other ranks learn which
requests failed from its ``retire`` broadcasts, and forget what they hold for
finished requests at the same time.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable

from mmpipe.dsl.plan import Plan
from mmpipe.graphs.base import ItemMeta
from mmpipe.runtime.batch import to_device
from mmpipe.runtime.channels import Packet, Stopped
from mmpipe.runtime.dist_link import Credits, Link, PeerLost
from mmpipe.runtime.fabric import Addr, Fabric

RETIRE_BATCH, RETIRE_S = 64, 0.02
ENVELOPE = "env"  # (ENVELOPE, [(addr, n), ...], [request id, ...], message): credits and retired requests riding on a message
# message kinds
PUT, BACK, STORE, RELEASE, COLLECT = "put", "back", "store", "release", "collect"
FINISH, GROUP_DONE, FAIL, EMPTY, STALL, RETIRE, CREDIT = "finish", "group_done", "fail", "empty", "stall", "retire", "credit"
EXPECT, PROGRESS = "expect", "progress"
CONTROL = ("hb", "log", "stats?", "stats", "stop", "bye", "reset")


def _wire(pkt: Packet) -> tuple[Any, ...]:
    return (pkt.items, pkt.values, pkt.mb, pkt.carry, pkt.group, pkt.isolated, pkt.gens)


def _unwire(t: tuple[Any, ...], device: str) -> Packet:
    items, values, mb, carry, group, isolated, gens = t
    if device != "cpu":  # tensors off the wire are on the host (NCCL's already on ``device``): a GPU needs a move
        values = to_device(values, device)
        carry = to_device(carry, device) if carry is not None else None
    return Packet(items, values, mb=mb, carry=carry, group=group, isolated=isolated, gens=gens)


class DistFabric(Fabric):
    """One rank's fabric (see the module docstring)."""

    def __init__(self, plan: Plan, rank: int) -> None:
        super().__init__(plan, rank)
        self.link: Link | None = None
        self.dead: set[str] = set()  # failed requests (ranks other than 0)
        self.credits: dict[Addr, Credits] = {}
        self.first_loop = {lp.stages[0] for lp in plan.loops}
        self.wait_stored_s = float(plan.runtime.get("timeout_s", 600))
        self.control: Callable[[int, Any], None] = lambda src, msg: None  # stats/stop/log, set by the pipeline
        self.collect_q: "queue.SimpleQueue[tuple[list[ItemMeta], dict[str, Any]] | None]" = queue.SimpleQueue()
        # Credits go back with the next message to their sender, alone once half an inbox is owed;
        # finished requests are announced in batches too (failed ones at once), riding on
        # the next message to each rank, else sent within RETIRE_S.
        self.owed: dict[tuple[int, Addr], int] = {}
        self.owed_lock = threading.Lock()
        self.retiring: dict[int, list[str]] = {}  # per rank, on rank 0
        self.retire_cond = threading.Condition()

    # ------------------------------------------------------------ sending
    def _send(self, rank: int, msg: Any, device: str = "cpu") -> None:
        """Send ``msg``; credits this rank owes ``rank`` and (on rank 0) the requests that
        finished since the last message to it ride along (no message of their own)."""
        assert self.link is not None
        owed = self._owed_to(rank)
        retires: list[str] = []
        if self.rank == 0 and self.retiring.get(rank):
            with self.retire_cond:
                retires, self.retiring[rank] = self.retiring.get(rank, []), []
        if owed or retires:
            msg = (ENVELOPE, owed, retires, msg)
        try:
            self.link.send(rank, msg, device)
        except PeerLost:
            if self.stopping():
                raise Stopped()
            raise

    def _ship(self, items: list[ItemMeta]) -> tuple[Any, Any]:
        rids = [m.request_id for m in items]
        return self.times.take(rids), self.assigner.known(rids)

    def bounded(self, addr: Addr) -> bool:
        """Inboxes that hold back their producers: not the inner stages of a loop body."""
        st = self.plan.stages[addr[0]]
        return not st.loop or st.index in self.first_loop

    def put(self, addr: Addr, pkt: Packet) -> None:
        if self.is_local(addr):
            return super().put(addr, pkt)
        if self.bounded(addr):
            self.credits.setdefault(addr, Credits(self.depth)).acquire(self.stopping)
        self._send(self.rank_of(addr), (PUT, addr, _wire(pkt), *self._ship(pkt.items)), self.device_of(addr))

    def put_back(self, addr: Addr, pkt: Packet, retry: bool = False) -> None:
        if self.is_local(addr):
            return super().put_back(addr, pkt, retry)
        self._send(self.rank_of(addr), (BACK, addr, _wire(pkt), retry, *self._ship(pkt.items)), self.device_of(addr))

    def store(self, addr: Addr, items: list[ItemMeta], values: dict[str, Any], ready: Any = None) -> None:
        if self.is_local(addr):
            return super().store(addr, items, values, ready)
        self._send(self.rank_of(addr), (STORE, addr, items, values), self.device_of(addr))

    def release(self, addr: Addr, items: list[ItemMeta]) -> None:
        if self.is_local(addr):
            return super().release(addr, items)
        self._send(self.rank_of(addr), (RELEASE, addr, items))

    def collect(self, items: list[ItemMeta], values: dict[str, Any], wait: bool = True) -> None:
        if self.rank == 0:
            return super().collect(items, values, wait)
        self._send(0, (COLLECT, items, values, *self._ship(items)))

    def finish_lanes(self, node: str, r: int, j: int, items: list[ItemMeta], gens: list[int] | None) -> None:
        s = next(lp.stages for lp in self.plan.loops if lp.node == node)[j]
        if self.is_local((s, r)):
            return super().finish_lanes(node, r, j, items, gens)
        self._send(self.rank_of((s, r)), (FINISH, node, r, j, items, gens))

    def group_done(self, node: str, r: int) -> None:
        first = next(lp.stages[0] for lp in self.plan.loops if lp.node == node)
        if self.is_local((first, r)):
            return super().group_done(node, r)
        self._send(self.rank_of((first, r)), (GROUP_DONE, node, r))

    # ------------------------------------------------------------ requests
    def is_live(self, rid: str) -> bool:
        return super().is_live(rid) if self.rank == 0 else rid not in self.dead

    def fail(self, rids: Iterable[str], error: dict[str, Any]) -> None:
        rids = list(rids)
        if self.rank == 0:
            return super().fail(rids, error)
        self.dead.update(rids)
        self._send(0, (FAIL, rids, error))

    def complete_empty(self, rids: Iterable[str]) -> None:
        if self.rank == 0:
            return super().complete_empty(rids)
        self._send(0, (EMPTY, list(rids)))

    def expect(self, counts: dict[str, int]) -> None:
        if self.rank == 0:
            return super().expect(counts)
        self._send(0, (EXPECT, counts))

    def report(self, items: list[ItemMeta], progress: list[Any]) -> None:
        if self.rank == 0:
            return super().report(items, progress)
        self._send(0, (PROGRESS, items, progress))

    def stall(self, s: int, node: str, message: str, kind: str = "StageTimeout") -> None:
        if self.rank == 0:
            return super().stall(s, node, message, kind)
        try:
            self._send(0, (STALL, s, node, message, kind))
        except (PeerLost, Stopped):
            self.stop_event.set()

    def retired(self, rids: list[str], failed: bool) -> None:
        super().retired(rids, failed)
        if self.rank != 0 or self.link is None:
            return
        if failed:  # other ranks must stop working for these at once
            self.link.broadcast((RETIRE, rids, True))
            return
        with self.retire_cond:
            for k in range(1, self.link.world):
                self.retiring.setdefault(k, []).extend(rids)
            if any(len(v) >= RETIRE_BATCH for v in self.retiring.values()):
                self.retire_cond.notify_all()

    def run_retirer(self) -> None:
        """Thread body on rank 0: announce finished requests that no other message took
        along, every ``RETIRE_S`` (or per batch)."""
        while not self.stopping():
            with self.retire_cond:
                self.retire_cond.wait(RETIRE_S)
            self.flush_retired()

    def flush_retired(self) -> None:
        """Announce every finished request not announced yet (rank 0; before a new run, so
        a request id used again is never forgotten by a late announcement)."""
        with self.retire_cond:
            due = [k for k, v in self.retiring.items() if v]
        for k in due:
            if self.link is not None and k not in self.link.lost:
                try:
                    self._send(k, (CREDIT, None, 0))  # an envelope: the retired requests ride on it
                except (PeerLost, Stopped):
                    pass

    # ------------------------------------------------------------ receiving
    def on_message(self, src: int, msg: Any) -> None:
        """Perform what another rank addressed to this one (a receiver thread; never blocks)."""
        kind = msg[0]
        self.progress()
        if kind == ENVELOPE:
            _, owed, retires, msg = msg
            for addr, n in owed:
                self.credits[addr].release(n)
            if retires:
                Fabric.retired(self, retires, False)
            kind = msg[0]
        if kind == PUT:
            _, addr, pk, times, choices = msg
            self._merge(times, choices)
            pkt = _unwire(pk, self.device_of(addr))
            if self.bounded(addr):
                pkt.on_take = lambda: self._credit(src, addr)
            self.inboxes[addr].put_nowait(pkt)
        elif kind == BACK:
            _, addr, pk, retry, times, choices = msg
            self._merge(times, choices)
            self.loop_inbox(addr).put_back(_unwire(pk, self.device_of(addr)), retry)
        elif kind == STORE:
            _, addr, items, values = msg
            Fabric.store(self, addr, items, to_device(values, self.device_of(addr)))
        elif kind == RELEASE:
            Fabric.release(self, msg[1], msg[2])
        elif kind == COLLECT:
            _, items, values, times, choices = msg
            self._merge(times, choices)
            try:  # at once when every stored value is here (the usual case) ...
                Fabric.collect(self, items, values, wait=False)
            except KeyError:  # ... else the collector thread waits for the rest
                self.collect_q.put((items, values))
        elif kind == FINISH:
            _, node, r, j, items, gens = msg
            self.loops[(node, r)].post_finish(j, items, gens)
        elif kind == GROUP_DONE:
            Fabric.group_done(self, msg[1], msg[2])
        elif kind == FAIL:
            Fabric.fail(self, msg[1], msg[2])
        elif kind == EMPTY:
            Fabric.complete_empty(self, msg[1])
        elif kind == EXPECT:
            Fabric.expect(self, msg[1])
        elif kind == PROGRESS:
            Fabric.report(self, msg[1], msg[2])
        elif kind == STALL:
            _, s, node, message, k = msg
            Fabric.stall(self, s, node, message, k)
        elif kind == RETIRE:
            _, rids, failed = msg
            if failed:
                self.dead.update(rids)
            Fabric.retired(self, rids, failed)
        elif kind == CREDIT:
            pass  # an envelope for owed credits and retired requests (handled above)
        elif kind in CONTROL:
            self.control(src, msg)
        else:
            raise ValueError(f"unknown message {kind!r} from rank {src}")

    def _merge(self, times: Any, choices: Any) -> None:
        if times:
            self.times.merge(times)
        if choices:
            self.assigner.merge(choices)

    def _credit(self, src: int, addr: Addr) -> None:
        """A packet from ``src`` left ``addr``'s inbox: its credit goes back with the next
        message to ``src`` (a stage's output usually goes there soon), or on its own once
        half an inbox is owed. No deadlock: a sender that waits holds no credit, so with
        fewer than half owed, more than half an inbox of its packets are still on their
        way here or queued, and taking them sends the credits."""
        with self.owed_lock:
            n = self.owed[(src, addr)] = self.owed.get((src, addr), 0) + 1
            if n < max(1, self.depth // 2):
                return
        try:
            self._send(src, (CREDIT, addr, 0))  # the owed credits ride on it
        except (PeerLost, Stopped):
            pass  # the sender is gone: nobody waits for these credits

    def _owed_to(self, rank: int) -> list[tuple[Addr, int]]:
        with self.owed_lock:
            out = [(addr, n) for (src, addr), n in self.owed.items() if src == rank and n]
            for addr, _ in out:
                self.owed[(rank, addr)] = 0
        return out

    def run_collector(self) -> None:
        """Thread body on rank 0: final values from other ranks -> the request table."""
        while not self.stopping():
            try:
                got = self.collect_q.get(timeout=0.05)
            except queue.Empty:
                continue
            if got is None:
                return
            try:
                Fabric.collect(self, *got)
            except Stopped:
                return
            except Exception as exc:
                items = got[0]
                self.table.fail({m.request_id for m in items},  # type: ignore[union-attr]
                                {"type": type(exc).__name__, "message": str(exc), "stage": self.p, "node": "outputs"})

    def wake_all(self) -> None:
        super().wake_all()
        self.collect_q.put(None)


def thread_count(threads_per_rank: int, local_world: int) -> int:
    """Intra-op threads of one rank: the setting, else this host's cores over its local ranks."""
    import os

    if threads_per_rank > 0:
        return threads_per_rank
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world))

