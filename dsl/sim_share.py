"""How the simulator's running calls share the hardware (``dsl/simulate.py`` steps them).

- **The interpreter.** A call first holds its process's GIL for the runtime's own cost
  per call; one call of a process runs Python at a time.
- **CPU cores.** The ops on one CPU host share its cores with each other and with the
  busy threads of other processes (``background``). An op keeps ``demand`` cores busy.
  When the ops need more threads than there are cores, they take turns as Linux does:
  they queue in the order they became ready, as many as the cores hold run (slowed in
  proportion by the background), and each yields its core after a time slice when
  others wait. Ops that keep less than half a core busy (sleeps, I/O) never queue.
- **Co-running.** An op whose profile measured it beside the same recipe on every other
  core (``corun``: how much slower it ran there) runs that much slower while the other
  cores of its host run ops, in proportion to how many of them do: memory-bound parts
  (a decoder step over a few rows) slow each other down, compute-bound ones hardly.
- **Devices.** The calls on one GPU share it evenly.

Pure Python, no torch.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Protocol, TypeVar

TINY = 1e-12


class Call(Protocol):
    """What sharing needs to know of a running call (the simulator's workers)."""

    demand: float  # cores it keeps busy while computing
    resource: tuple[Any, ...]  # ("cpu", host) or ("dev", host, process, device)
    proc: int  # the process whose interpreter it holds
    gil_left: float  # seconds of the runtime's own work left, done first
    left: float  # seconds of work left
    slice_left: float  # of its turn on a core
    corun: float  # how much slower it runs with every other core busy (1.0: no slower)


W = TypeVar("W", bound=Call)


class Sharing:
    """The cores of every CPU host and the order their ops wait in (see the module docstring)."""

    def __init__(self, cores: float, background: float, quantum: float) -> None:
        self.cores, self.background, self.quantum = cores, background, quantum
        self.queues: dict[tuple[Any, ...], deque[Any]] = {}  # per CPU host: ops in the order they became ready

    def rates(self, running: list[W]) -> tuple[dict[int, float], list[W]]:
        """Progress per second of every running call (by ``id``), and the calls on a core
        while others wait for one (their time slices run out)."""
        by: dict[tuple[Any, ...], list[W]] = {}
        for w in running:
            by.setdefault(("gil", w.proc) if w.gil_left > TINY else w.resource, []).append(w)
        out: dict[int, float] = {}
        turns: list[W] = []
        for res, ws in by.items():
            if res[0] == "gil":  # one thread of a process runs Python at a time
                f = 1.0 / len(ws)
            elif res[0] == "cpu":
                on = self.on_cores(res, ws)
                if len(on) < len(ws):  # others wait: these give way when their slices run out
                    turns += [w for w in on if threads_of(w)]
                ws = on
                need = sum(w.demand for w in ws) + self.background
                f = min(1.0, self.cores / need) if need > 0 else 1.0
                busy = sum(threads_of(w) for w in ws)
                for w in ws:  # slowed by what runs on the other cores (see the module docstring)
                    others = min(1.0, (busy - threads_of(w)) / (self.cores - 1)) if self.cores > 1 else 0.0
                    out[id(w)] = f / (1.0 + (w.corun - 1.0) * others)
                continue
            else:
                f = 1.0 / len(ws)
            for w in ws:
                out[id(w)] = f
        for w in running:
            out.setdefault(id(w), 0.0)
        return out, turns

    def on_cores(self, res: tuple[Any, ...], ws: list[W]) -> list[W]:
        """The ops of one CPU host that have a core now: all of them when their threads fit,
        else the first in the queue that fit (ops that keep less than half a core busy
        always run)."""
        q = self.queues.setdefault(res, deque())
        live = {id(w) for w in ws}
        if len(q) != len(ws) or any(id(w) not in live for w in q):
            known = {id(w) for w in q}
            q = self.queues[res] = deque([w for w in q if id(w) in live] + [w for w in ws if id(w) not in known])
        if sum(threads_of(w) for w in ws) <= self.cores:
            return ws
        on: list[W] = []
        used = 0
        for w in q:
            if not threads_of(w) or not on or used + threads_of(w) <= self.cores:
                on.append(w)
                used += threads_of(w)
        return on

    def end_slices(self, turns: list[W], dt: float) -> None:
        """``dt`` seconds passed: a call whose slice is over goes to the back of its host's queue."""
        for w in turns:
            w.slice_left -= dt
            if w.slice_left <= TINY and w.left > TINY:
                q = self.queues[w.resource]
                q.remove(w)
                q.append(w)
                w.slice_left = self.quantum


def threads_of(w: Call) -> int:
    """The busy threads an op runs (its measured demand is noisy: 1.05 cores is one thread)."""
    return int(w.demand + 0.5)


def linux_time_slice(cores: float) -> float:
    """Linux's default time slice in seconds (EEVDF's base slice, 0.75 ms, scaled by
    1 + log2 of the CPUs, at most 8, as ``sched_tunable_scaling``'s default does)."""
    return 0.00075 * (1 + int(math.log2(max(1, min(8, int(cores))))))
