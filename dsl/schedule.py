"""Schedules as pure functions: tables of (step, stage) -> action.

A table is a list of steps; each step is a list with one entry per stage:
an ``Action`` (micro-batch ``mb``, loop ``trip``) or ``None`` (idle). The
runtime does not replay these tables step by step (it is event driven); they
are the model it is measured against and what ``mmpipe plan`` prints.
"""
from __future__ import annotations

from dataclasses import dataclass

Table = list[list["Action | None"]]


@dataclass(frozen=True, order=True)
class Action:
    mb: int
    trip: int = 0

    def __str__(self) -> str:
        return f"{self.mb}" if self.trip == 0 else f"{self.mb}.{self.trip}"


def _empty(steps: int, p: int) -> Table:
    return [[None] * p for _ in range(steps)]


def streaming(p: int, m: int) -> Table:
    """Micro-batches 0..m-1 flow through p stages back to back (no flush).

    At step t stage s works on micro-batch t - s: m + p - 1 steps in all.
    """
    if p <= 0 or m < 0:
        raise ValueError("need p >= 1 stages and m >= 0 micro-batches")
    table = _empty(m + p - 1 if m else 0, p)
    for t, row in enumerate(table):
        for s in range(p):
            if 0 <= t - s < m:
                row[s] = Action(t - s)
    return table


def gpipe(p: int, m: int, batches: int = 1) -> Table:
    """GPipe fill-drain, forward only: each batch of m micro-batches drains
    before the next starts (``batches`` * (m + p - 1) steps)."""
    table: Table = []
    for b in range(batches):
        for row in streaming(p, m):
            table.append([Action(a.mb + b * m) if a else None for a in row])
    return table


def loop_reentry(p: int, trips: list[int], inflight: int) -> Table:
    """A loop body on p stages: micro-batch i passes all p stages ``trips[i]``
    times, re-entering stage 0 after the last; at most ``inflight`` micro-batches
    are inside the loop; a finished one leaves and the next waiting one joins.

    Each stage runs one micro-batch per step, oldest-ready first.
    """
    if p <= 0 or inflight <= 0 or any(t <= 0 for t in trips):
        raise ValueError("need p >= 1, inflight >= 1 and positive trip counts")
    waiting = list(range(len(trips)))
    ready: dict[int, list[tuple[int, int, int]]] = {s: [] for s in range(p)}  # stage -> (ready_step, mb, trip)
    active = 0
    table: Table = []
    t = 0
    done = 0
    while done < len(trips):
        while waiting and active < inflight:
            ready[0].append((t, waiting.pop(0), 0))
            active += 1
        row: list[Action | None] = [None] * p
        moves = []
        for s in range(p):
            cands = sorted(x for x in ready[s] if x[0] <= t)
            if cands:
                ready[s].remove(cands[0])
                _, mb, trip = cands[0]
                row[s] = Action(mb, trip)
                moves.append((s, mb, trip))
        for s, mb, trip in moves:
            if s + 1 < p:
                ready[s + 1].append((t + 1, mb, trip))
            elif trip + 1 < trips[mb]:
                ready[0].append((t + 1, mb, trip + 1))
            else:
                active -= 1
                done += 1
        table.append(row)
        t += 1
    return table


def bubble(table: Table) -> float:
    """Fraction of idle (step, stage) cells."""
    cells = sum(len(r) for r in table)
    return 0.0 if not cells else sum(a is None for r in table for a in r) / cells


def theory_bubble(p: int, m: int) -> float:
    """GPipe's (p - 1) / (m + p - 1)."""
    return (p - 1) / (m + p - 1)


def grid(table: Table, mark: tuple[int, int] | None = None, stage_names: list[str] | None = None) -> str:
    """Print a table as a stage x step grid; ``mark`` = (step, stage) is shown as ``!x!``."""
    if not table:
        return "(empty schedule)"
    p = len(table[0])
    names = stage_names or [f"stage {s}" for s in range(p)]
    cells = [[("." if a is None else str(a)) for a in row] for row in table]
    if mark is not None:
        t, s = mark
        cells[t][s] = f"!{cells[t][s]}!"
    w = max(3, max(len(c) for row in cells for c in row))
    nw = max(len(n) for n in names)
    head = " " * nw + " | " + " ".join(str(t).rjust(w) for t in range(len(table)))
    lines = [head, "-" * len(head)]
    for s in range(p):
        lines.append(names[s].ljust(nw) + " | " + " ".join(cells[t][s].rjust(w) for t in range(len(table))))
    return "\n".join(lines)
