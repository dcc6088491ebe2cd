"""Sending what a stage produced to its consumers: routes, replica choice, device moves.

Every stage worker owns one ``Outlet`` (its movers are its own: no sharing). A
delivery puts each routed value once per consumer: in the packet to the next
stage, or in a consumer's side store; a key the producer did not make is put
as ``MISSING`` so a consumer never waits for it.

Replicas: a node may run as N copies (``nodes.X.replicas``). The first delivery
that reaches any stage of X for a request picks X's copy for that request
(``Assigner``: the copy with the fewest live requests, one choice per
micro-batch so micro-batches stay whole) and every later delivery for the
request follows that choice, so the pieces of one copy form a chain and loop
items stay with the copy that holds their lanes. All items of a request (the
windows of one recording) go to the same copy.
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Iterable

from mmpipe.dsl.plan import Plan
from mmpipe.graphs.base import ItemMeta, select_rows
from mmpipe.runtime.channels import MISSING, Packet
from mmpipe.runtime.routing import INPUTS, Route, Routes
from mmpipe.runtime.trace import WorkerLog
from mmpipe.runtime.transfer import Mover

if TYPE_CHECKING:
    from mmpipe.runtime.fabric import Fabric

# request id -> node -> chosen copy
Choices = dict[str, dict[str, int]]


class Assigner:
    """Which copy of each replicated node serves each request (shared by a process's outlets)."""

    def __init__(self, plan: Plan) -> None:
        self.copies = {st.owner: len(st.places) for st in plan.stages if len(st.places) > 1}
        self.lock = threading.Lock()
        self.choice: Choices = {}
        self.mine: dict[str, list[tuple[str, int]]] = {}  # choices made here (they count as load here)
        self.load = {node: [0] * n for node, n in self.copies.items()}
        self.turn = {node: 0 for node in self.copies}

    def pick(self, node: str, rids: Iterable[str]) -> dict[str, int]:
        """The copy of ``node`` for each request; those without one get the least-loaded copy."""
        with self.lock:
            out: dict[str, int] = {}
            fresh = []
            for rid in dict.fromkeys(rids):
                c = self.choice.get(rid, {}).get(node)
                if c is None:
                    fresh.append(rid)
                else:
                    out[rid] = c
            if fresh:
                load = self.load[node]
                n = len(load)
                # least loaded; ties rotate so equal copies take turns
                start = self.turn[node]
                best = min(range(n), key=lambda k: (load[(start + k) % n], k))
                c = (start + best) % n
                self.turn[node] = (c + 1) % n
                for rid in fresh:
                    self.choice.setdefault(rid, {})[node] = c
                    self.mine.setdefault(rid, []).append((node, c))
                    out[rid] = c
                load[c] += len(fresh)
            return out

    def known(self, rids: Iterable[str]) -> Choices:
        """The choices made so far for these requests (shipped with items to another process)."""
        with self.lock:
            return {rid: dict(c) for rid in dict.fromkeys(rids) if (c := self.choice.get(rid))}

    def merge(self, choices: Choices) -> None:
        with self.lock:
            for rid, c in choices.items():
                self.choice.setdefault(rid, {}).update(c)

    def retire(self, rids: Iterable[str]) -> None:
        """The requests finished or failed: forget their choices and the load they counted."""
        with self.lock:
            for rid in rids:
                self.choice.pop(rid, None)
                for node, c in self.mine.pop(rid, ()):
                    self.load[node][c] -= 1


class Outlet:
    """One worker's sending side: ``deliver`` values, move loop carries (see the module docstring)."""

    def __init__(self, fabric: "Fabric", routes: Routes, s: int, r: int, device: str, log: WorkerLog | None) -> None:
        self.fabric, self.routes, self.s, self.r, self.device, self.log = fabric, routes, s, r, device, log
        self.plan = fabric.plan
        self.p = self.plan.num_stages
        self.movers: dict[str, Mover] = {}
        # what ``deliver`` sends, and what a loop stage's prelude sends (``deliver_prelude``)
        prelude = set(routes.prelude.get(s, ()))
        out = routes.out.get(s, {})
        self.routes_out = [(k, rt) for k, rt in out.items() if k not in prelude]
        self.routes_prelude = [(k, rt) for k, rt in out.items() if k in prelude]

    # ------------------------------------------------------------ values
    def deliver(self, items: list[ItemMeta], values: dict[str, Any], mb: int) -> None:
        """Send what this stage produced to its consumers (packet, side stores, collector).
        A loop stage's prelude delivers its own values (``deliver_prelude``), not these."""
        self._deliver(items, values, mb, self.routes_out, hand_on=True)

    def deliver_prelude(self, items: list[ItemMeta], values: dict[str, Any], mb: int) -> None:
        """What a loop stage's prelude made for items entering the loop, to the side stores of
        its consumers (no packet: the items go on through the loop)."""
        self._deliver(items, values, mb, self.routes_prelude, hand_on=False)

    def _deliver(self, items: list[ItemMeta], values: dict[str, Any], mb: int, routes: list[tuple[str, Route]], hand_on: bool) -> None:
        to_next: dict[str, Any] = {}
        stored: dict[int, dict[str, Any]] = {}
        for key, route in routes:
            v = values.get(key, MISSING)
            if route.to_next and v is not MISSING:
                to_next[key] = v
            for c in route.store:
                stored.setdefault(c, {})[key] = v
        for c, vals in stored.items():
            for r, sub, sv in self._by_copy(c, items, vals):
                moved, ev = self._move((c, r), sv, mb, len(sub))
                self.fabric.store((c, r), sub, moved, ev)
        if not hand_on:
            return  # a prelude: the items themselves stay in the loop
        if self.s + 1 == self.p:
            self.fabric.collect(items, to_next)
            return
        for r, sub, sv in self._by_copy(self.s + 1, items, to_next):
            moved, ev = self._move((self.s + 1, r), sv, mb, len(sub))
            self.fabric.put((self.s + 1, r), Packet(sub, moved, mb=mb, ready=ev))

    def _by_copy(self, c: int, items: list[ItemMeta], values: dict[str, Any]) -> list[tuple[int, list[ItemMeta], dict[str, Any]]]:
        """Items (and their rows of ``values``) grouped by the copy of consumer stage ``c``."""
        if c >= self.p or len(self.plan.stages[c].places) == 1:
            return [(0, items, values)]
        choice = self.fabric.assigner.pick(self.plan.stages[c].owner, [m.request_id for m in items])
        groups: dict[int, list[int]] = {}
        for i, m in enumerate(items):
            groups.setdefault(choice[m.request_id], []).append(i)
        if len(groups) == 1:
            (r,) = groups
            return [(r, items, values)]
        return [(r, [items[i] for i in rows], {k: v if v is MISSING else select_rows(v, rows) for k, v in values.items()})
                for r, rows in sorted(groups.items())]

    # ------------------------------------------------------------ loops
    def to_stage(self, c: int, pkt: Packet, back: bool = False, retry: bool = False) -> None:
        """A loop packet (carry only) to copy ``self.r`` of stage ``c``."""
        if pkt.carry is not None:
            moved, pkt.ready = self._move((c, self.r), {"carry": pkt.carry}, pkt.mb, len(pkt.items))
            pkt.carry = moved["carry"]
        if back or retry:
            self.fabric.put_back((c, self.r), pkt, retry=retry)
        else:
            self.fabric.put((c, self.r), pkt)

    def _move(self, dst: tuple[int, int], values: dict[str, Any], mb: int, n: int) -> tuple[dict[str, Any], Any]:
        """``values`` on the consumer's device (another process moves them on arrival)."""
        if not values or not self.fabric.is_local(dst):
            return values, None
        dev = self.fabric.device_of(dst)
        src = "cpu" if self.s == INPUTS else self.device
        if dev == src:
            return values, None
        mover = self.movers.get(dev)
        if mover is None:
            mover = self.movers[dev] = Mover(src, dev)
        t0 = time.perf_counter()
        out = mover.move(values)
        if self.log is not None:
            self.log.transfers.append((t0, time.perf_counter(), mb, n, f"to stage {dst[0]}"))
        return out
