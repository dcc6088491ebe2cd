"""What stage workers see of the rest of the pipeline: the ``Fabric``.

A worker never holds the pipeline object. It reaches other stage copies by
address, ``(stage, replica)``: their inboxes (``put``, ``put_back``), their
side stores (``store``, ``release``), loop bookkeeping (``finish_lanes``,
``group_done``), the driver's request table (``is_live``, ``fail``, ``collect``,
``complete_empty``, ``stall``) and its own process's time book. This class
serves every address from this process (the threads backend, and the local
half of a distributed rank); ``dist_fabric.DistFabric`` sends what is
addressed to another rank over torch.distributed instead.
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Iterable

from mmpipe.dsl.plan import Plan
from mmpipe.graphs.base import ItemMeta
from mmpipe.runtime.batching import group_key
from mmpipe.runtime.channels import Inbox, LoopInbox, Packet, SideStore
from mmpipe.runtime.deliver import Assigner
from mmpipe.runtime.requests import RequestTable, TimeBook
from mmpipe.runtime.routing import Routes, build_routes

if TYPE_CHECKING:
    from mmpipe.runtime.loop import LoopLocal

Addr = tuple[int, int]  # (stage, replica); stage p is the collector on the driver


class Fabric:
    """Addresses served in this process (see the module docstring)."""

    def __init__(self, plan: Plan, rank: int = 0, routes: Routes | None = None) -> None:
        self.plan, self.rank = plan, rank
        self.p = plan.num_stages
        self.routes = routes or build_routes(plan)
        self.assigner = Assigner(plan)
        self.times = TimeBook()
        self.stop_event = threading.Event()
        self.broken: str | None = None
        rt = plan.runtime
        self.depth = int(rt.get("queue_depth", 4))
        self.max_batch = int(plan.batching.get("max_batch_size", 8))
        mi = int(rt.get("max_inflight", 0))
        self.inboxes: dict[Addr, Inbox] = {}
        self.stores: dict[Addr, SideStore] = {}
        self.loops: dict[tuple[str, int], "LoopLocal"] = {}
        for st in plan.stages:
            first = st.loop and next(lp.stages[0] for lp in plan.loops if lp.node == st.loop) == st.index
            for r, place in enumerate(st.places):
                if place.rank != rank:
                    continue
                addr = (st.index, r)
                if first:
                    body = len(next(lp.stages for lp in plan.loops if lp.node == st.loop))
                    self.inboxes[addr] = LoopInbox(self.depth, self.stopping, mi if mi > 0 else max(2, body), self.max_batch,
                                                   self.item_group)
                else:
                    # Inside a loop body (not its first stage) admission bounds the queue instead.
                    self.inboxes[addr] = Inbox(1 << 30 if st.loop else self.depth, self.stopping)
                self.stores[addr] = SideStore()
        self.table: RequestTable | None = None
        if rank == 0:
            self.stores[(self.p, 0)] = SideStore()  # the collector's
        self.last_progress = time.monotonic()
        # In one process a producer stores values before it hands the items on, so they are
        # always there; from another process they may still be on their way (DistFabric).
        self.wait_stored_s = 0.0

    def item_group(self, m: ItemMeta) -> tuple[str, ...]:
        """What an item must share with a loop group to join it (the plan's ``group_by``)."""
        return group_key(m.params, list(self.plan.batching.get("group_by") or []))

    # ------------------------------------------------------------ places
    def is_local(self, addr: Addr) -> bool:
        return self.rank_of(addr) == self.rank

    def device_of(self, addr: Addr) -> str:
        s, r = addr
        return "cpu" if s >= self.p else self.plan.stages[s].places[r].device

    def rank_of(self, addr: Addr) -> int:
        s, r = addr
        return 0 if s >= self.p else self.plan.stages[s].places[r].rank

    def inbox(self, addr: Addr) -> Inbox:
        return self.inboxes[addr]

    def loop_inbox(self, addr: Addr) -> LoopInbox:
        ib = self.inboxes[addr]
        assert isinstance(ib, LoopInbox), f"stage {addr[0]} is not a loop's first stage"
        return ib

    # ------------------------------------------------------------ values
    def put(self, addr: Addr, pkt: Packet) -> None:
        """Into a main inbox, waiting while it is full."""
        self.inboxes[addr].put(pkt)

    def put_back(self, addr: Addr, pkt: Packet, retry: bool = False) -> None:
        """Back into a loop's first stage (never blocks)."""
        self.loop_inbox(addr).put_back(pkt, retry)

    def store(self, addr: Addr, items: list[ItemMeta], values: dict[str, Any], ready: Any = None) -> None:
        store = self.stores[addr]
        store.put(items, values, ready)
        for rid in {m.request_id for m in items}:
            if not self.is_live(rid):  # failed meanwhile: do not keep its values
                store.purge(rid)

    def take_stored(self, addr: Addr, items: list[ItemMeta], pop: bool, wait: bool = True) -> tuple[dict[str, Any], list[Any]]:
        """Values addressed to ``addr`` for these items (waiting for those still on their way,
        unless ``wait`` is False: then a KeyError says some are not there yet)."""
        s = addr[0]
        keys = self.routes.store_reads[s]
        if not keys:
            return {}, []
        return self.stores[addr].take(keys, items, pop, self.wait_stored_s if wait else 0.0, self.stopping)

    def release(self, addr: Addr, items: list[ItemMeta]) -> None:
        self.stores[addr].release(items)

    def collect(self, items: list[ItemMeta], values: dict[str, Any], wait: bool = True) -> None:
        """Final values of finished items: with the collector's stored ones, to the request table."""
        stored, _ = self.take_stored((self.p, 0), items, pop=True, wait=wait)
        assert self.table is not None, "only the driver collects"
        self.table.collect(items, {**values, **stored})

    # ------------------------------------------------------------ loops
    def finish_lanes(self, node: str, r: int, j: int, items: list[ItemMeta], gens: list[int] | None) -> None:
        """Items left loop ``node`` (copy ``r``): body stage ``j`` frees their lanes (its own thread does)."""
        self.loops[(node, r)].post_finish(j, items, gens)

    def group_done(self, node: str, r: int) -> None:
        first = next(lp.stages[0] for lp in self.plan.loops if lp.node == node)
        self.loop_inbox((first, r)).group_done()

    # ------------------------------------------------------------ requests
    def is_live(self, rid: str) -> bool:
        assert self.table is not None
        return self.table.is_live(rid)

    def fail(self, rids: Iterable[str], error: dict[str, Any]) -> None:
        assert self.table is not None
        self.table.fail(rids, error)

    def complete_empty(self, rids: Iterable[str]) -> None:
        assert self.table is not None
        self.table.complete_empty(rids)

    def report(self, items: list[ItemMeta], progress: list[Any]) -> None:
        """How far unfinished items got, for whoever submitted their requests."""
        assert self.table is not None
        self.table.report(items, progress)

    def expect(self, counts: dict[str, int]) -> None:
        """A streamed expansion ended: how many items each request has."""
        assert self.table is not None
        self.table.expect(counts)

    def retired(self, rids: list[str], failed: bool) -> None:
        """The driver resolved these requests: forget what this process holds for them."""
        for store in self.stores.values():
            for rid in rids:
                store.purge(rid)
        self.assigner.retire(rids)
        self.times.drop(rids)

    def add_time(self, items: list[ItemMeta], s: int, dt: float) -> None:
        self.times.add(items, s, dt)

    def progress(self) -> None:
        self.last_progress = time.monotonic()
        if self.table is not None:
            self.table.progress()

    def stopping(self) -> bool:
        return self.stop_event.is_set()

    def stall(self, s: int, node: str, message: str, kind: str = "StageTimeout") -> None:
        """Stop the pipeline and fail every unfinished request with ``message``."""
        self.broken = message
        self.stop_event.set()
        if self.table is not None:
            self.table.fail_all({"type": kind, "message": message, "stage": s, "node": node})

    def wake_all(self) -> None:
        for ib in self.inboxes.values():
            ib.wake()

    def store_size(self) -> int:
        return sum(s.size() for s in self.stores.values())
