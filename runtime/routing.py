"""Static routing tables: where each value a stage produces must go.

Computed once from the plan. A value produced on stage ``s`` travels inside
the packet to stage ``s + 1`` when that stage reads it (and is not a loop
stage); every other consumer, including the final output collector (stage
index ``p``), gets it through the side store, addressed to that consumer only.
Loop body stages read all their inputs from the side store: their packets carry
only items and the loop carry, so a waiting item can be taken out of a packet
and joined to a running group without splitting any values. A loop's first stage
may run a prelude (the end of the node before the loop) as items enter; what the
prelude makes also reaches every other consumer through the side store.
"""
from __future__ import annotations

from dataclasses import dataclass

from mmpipe.dsl.plan import Plan, Unit

INPUTS = -1  # the batcher, producer of request inputs


@dataclass
class Route:
    to_next: bool  # in the packet to stage s + 1
    store: list[int]  # consumer stages reached through the side store


@dataclass
class Routes:
    out: dict[int, dict[str, Route]]  # producer stage (INPUTS too) -> key -> route
    store_reads: list[list[str]]  # per consumer stage 0..p: keys taken from the side store
    final_keys: list[str]  # value keys the recipe outputs are made of
    input_keys: list[str]  # request fields any stage reads
    expands: list[bool]  # per stage: has a node that turns items into several
    prelude: dict[int, list[str]]  # loop stage -> keys its prelude makes (they go through side stores only)


def produced(plan: Plan, s: int, units: list[Unit] | None = None) -> list[str]:
    """Value keys stage ``s`` (or these ``units`` of it) produces: carries between pieces,
    or a node's outputs."""
    if s == INPUTS:
        return sorted(k for k in plan.consumers if k.startswith("inputs."))
    keys = []
    for u in plan.stages[s].units if units is None else units:
        node = plan.nodes[u.node]
        if u.piece < node.split - 1:
            if not node.loop:
                keys.append(f"{u.node}#{u.piece}")
        else:
            keys += [f"{u.node}.{p.name}" for p in node.out_ports]
    return keys


def build_routes(plan: Plan) -> Routes:
    p = plan.num_stages
    out: dict[int, dict[str, Route]] = {}
    store_reads: list[set[str]] = [set() for _ in range(p + 1)]
    prelude: dict[int, list[str]] = {}
    for s in range(INPUTS, p):
        table: dict[str, Route] = {}
        if s >= 0 and plan.stages[s].prelude:
            prelude[s] = produced(plan, s, plan.stages[s].prelude)
        for key in produced(plan, s):
            route = Route(False, [])
            for c in plan.consumers.get(key, []):
                if c <= s:
                    continue  # read inside the producing stage itself
                # a prelude's values are made as items enter the loop, long before they
                # leave it: they wait in the consumers' side stores
                if c == s + 1 and (c == p or not plan.stages[c].loop) and key not in prelude.get(s, ()):
                    route.to_next = True
                else:
                    route.store.append(c)
                    store_reads[c].add(key)
            if route.to_next or route.store:
                table[key] = route
        out[s] = table
    return Routes(
        out=out,
        store_reads=[sorted(k) for k in store_reads],
        final_keys=sorted(set(plan.outputs.values())),
        input_keys=produced(plan, INPUTS),
        expands=[any(plan.nodes[u.node].expands for u in st.units) for st in plan.stages],
        prelude=prelude,
    )
