"""One process's share of a pipeline: its stage copies' pieces and workers.

The threads backend runs every copy of every stage here; a distributed rank
runs the copies placed on it. ``Core`` builds the node pieces (weights load
here, and only for this process's copies), one worker thread per copy, and a
watchdog; ``close`` stops and joins them.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import torch

from mmpipe.graphs.base import NodeKind
from mmpipe.runtime.deliver import Outlet
from mmpipe.runtime.execute import LoopBody
from mmpipe.runtime.fabric import Addr, Fabric
from mmpipe.runtime.loop import LoopLocal, LoopWorker
from mmpipe.runtime.nodes import build_unit
from mmpipe.runtime.stage import Slot, StageWorker, WorkerSpec
from mmpipe.runtime.supervise import Watchdog
from mmpipe.runtime.trace import Recorder, WorkerInfo

THREAD_PREFIX = "mmpipe-"


class Core:
    """Workers for the stage copies of ``fabric.rank`` (see the module docstring)."""

    def __init__(self, fabric: Fabric, output_dir: str | None = None) -> None:
        self.fabric, self.plan, self.output_dir = fabric, fabric.plan, output_dir
        self.addrs: list[Addr] = [(st.index, r) for st in self.plan.stages for r, pl in enumerate(st.places) if pl.rank == fabric.rank]
        self.insts: dict[tuple[int, int, str, int], NodeKind] = {}  # (stage, copy, node, piece)
        infos = [WorkerInfo(s, r, fabric.rank, fabric.device_of((s, r)), self.plan.stage_label(self.plan.stages[s]), self.plan.stages[s].loop)
                 for s, r in self.addrs]
        self.recorder = Recorder(infos, self.plan.num_stages)
        self.workers: list[StageWorker] = []
        self.threads: list[threading.Thread] = []

    def build(self) -> None:
        """Instantiate and set up every local piece (loads weights)."""
        for s, r in self.addrs:
            st = self.plan.stages[s]
            for u in st.units:
                if (s, r, u.node, u.piece) not in self.insts:
                    self.insts[(s, r, u.node, u.piece)] = build_unit(self.plan, u, self.fabric.device_of((s, r)), self.output_dir)

    def start(self, extra: list[tuple[Callable[[], None], str]], in_flight: Callable[[], int] | None) -> None:
        """Start one thread per local stage copy, the watchdog and ``extra`` bodies."""
        fabric, plan = self.fabric, self.plan
        fabric.loops.clear()
        for lp in plan.loops:
            for r in range(len(plan.stages[lp.stages[0]].places)):
                bodies = {j: LoopBody(plan.stages[s].loop_unit, self.insts[(s, r, lp.node, plan.stages[s].loop_unit.piece)],  # type: ignore[arg-type]
                                      fabric.device_of((s, r)))
                          for j, s in enumerate(lp.stages) if (s, r) in self.addrs}
                if bodies:
                    fabric.loops[(lp.node, r)] = LoopLocal(fabric, lp.node, r, lp.stages, bodies)
        self.workers = []
        process_threads = torch.get_num_threads()
        per_stage = int(plan.runtime.get("threads_per_stage", 0))
        for log, (s, r) in zip(self.recorder.logs, self.addrs):
            st = plan.stages[s]
            spec = WorkerSpec(fabric, (s, r), fabric.device_of((s, r)), [(u, self.insts[(s, r, u.node, u.piece)]) for u in st.units],
                              Outlet(fabric, fabric.routes, s, r, fabric.device_of((s, r)), log), log, Slot(), threads=per_stage)
            self.workers.append(LoopWorker(spec, fabric.loops[(st.loop, r)]) if st.loop else StageWorker(spec))
        targets = [(w.run, f"stage{w.s}" + (f".{w.r}" if w.r else "")) for w in self.workers] + extra
        targets.append((Watchdog(fabric, self.workers, in_flight).run, "watchdog"))
        # Daemon threads: a node call that never returns must not keep the process alive.
        self.threads = [threading.Thread(target=fn, name=THREAD_PREFIX + name, daemon=True) for fn, name in targets]
        for t in self.threads:
            t.start()
        if per_stage > 0 and per_stage != process_threads:
            # a worker's set_num_threads also changed what threads set up later start with
            # (the caller's own, for one): back to the process's count once all have set theirs
            for w in self.workers:
                w.spec.started.wait(30)
            torch.set_num_threads(process_threads)

    def stop(self, grace_s: float) -> list[str]:
        """Stop and join every thread (a node call cannot be interrupted: a hanging one
        gets ``grace_s``); returns the names of threads still running."""
        self.fabric.stop_event.set()
        self.fabric.wake_all()
        deadline = time.monotonic() + grace_s
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        left = [t.name for t in self.threads if t.is_alive()]
        self.threads = [t for t in self.threads if t.is_alive()]
        return left

    def lanes_held(self) -> int:
        return sum(len(b.lanes) for lp in self.fabric.loops.values() for b in lp.bodies.values())

    def first_insts(self) -> dict[tuple[str, int], Any]:
        """(node, piece) -> the piece of copy 0 (for reports such as resolved model paths)."""
        return {(node, piece): inst for (s, r, node, piece), inst in self.insts.items() if r == 0}
