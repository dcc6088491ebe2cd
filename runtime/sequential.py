"""The sequential reference executor: the oracle for every other runtime.

It runs one request at a time, node pieces in plan order, each on its stage's
device, and a loop node's whole body until every item is done. No threads, no
micro-batching: what it returns is what a pipeline must return.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from mmpipe.dsl.plan import Plan, Stage
from mmpipe.graphs.base import LoopKind, NodeKind, Request
from mmpipe.runtime.batch import MicroBatch, from_requests, row, to_device
from mmpipe.runtime.execute import LoopBody, NodeError, Stream, node_inputs, retire_done, rows_to_batch, run_unit
from mmpipe.runtime.nodes import build_unit
from mmpipe.runtime.results import Result, assemble
from mmpipe.runtime.stage import use_threads
from mmpipe.runtime.trace import Recorder, WorkerInfo

Progress = Callable[[Result], None]


class SequentialExecutor:
    """Runs a plan one request at a time (``runtime.backend=sequential``)."""

    def __init__(self, plan: Plan, output_dir: str | None = None) -> None:
        self.plan = plan
        self.output_dir = output_dir
        self.insts: dict[tuple[str, int], NodeKind] = {}
        self.timeout_s = float(plan.runtime.get("timeout_s", 600))
        self._n = 0  # index of the request being run (the micro-batch id of its spans)
        # one track per stage, as a pipeline would have: the trace shows the stages taking turns
        self.recorder = Recorder([WorkerInfo(s.index, 0, 0, s.device, plan.stage_label(s), s.loop) for s in plan.stages], plan.num_stages)

    def start(self) -> "SequentialExecutor":
        """Build and set up every piece (loads weights)."""
        for s in self.plan.stages:
            for u in s.units:
                if (u.node, u.piece) not in self.insts:
                    self.insts[(u.node, u.piece)] = build_unit(self.plan, u, s.device, self.output_dir)
        return self

    def close(self) -> None:
        self.insts.clear()

    def __enter__(self) -> "SequentialExecutor":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def run(self, requests: list[Request], progress: Progress | None = None, on_progress: Any = None) -> list[Result]:
        """Results in request order; ``on_progress`` is accepted for the pipelines' interface
        and not called (one request at a time: no partial progress to report)."""
        if not self.insts:
            self.start()
        self.recorder.reset()
        before = torch.get_num_threads()
        threads = use_threads(int(self.plan.runtime.get("threads_per_stage", 0)))  # as a pipeline's stage workers
        for log in self.recorder.logs:
            log.info.threads = threads
        try:
            return self._run_all(requests, progress)
        finally:
            if threads != before:
                torch.set_num_threads(before)

    def _run_all(self, requests: list[Request], progress: Progress | None) -> list[Result]:
        results = []
        for n, req in enumerate(requests):
            t0 = time.perf_counter()
            timings: dict[str, float] = {}
            self._n = n
            try:
                rows = self._run_one(req, timings)
                outputs = assemble(self.plan, rows)[req.id]
                res = Result(req.id, req.input, outputs=outputs)
            except NodeError as e:
                res = Result(req.id, req.input, error=e.to_dict())
            res.timings = {"stages_s": {k: round(v, 6) for k, v in timings.items()}, "latency_s": round(time.perf_counter() - t0, 6)}
            self.recorder.request_done(req.id, t0, res.ok)
            results.append(res)
            if progress:
                progress(res)
        return results

    def stats(self, wall_s: float) -> dict[str, Any]:
        return self.recorder.stats(wall_s)

    def write_trace(self, path: Any) -> Any:
        """Chrome trace of the last ``run``: a track per stage, one request at a time."""
        return self.recorder.write_trace(path)

    # ----------------------------------------------------------------
    def _run_one(self, req: Request, timings: dict[str, float]) -> list[tuple[Any, dict[str, Any]]]:
        plan = self.plan
        input_keys = sorted(k for k in plan.consumers if k.startswith("inputs."))
        mb = from_requests(plan, [req], input_keys)
        deadline = time.monotonic() + self.timeout_s
        done_loops: set[str] = set()
        for stage in plan.stages:
            t0 = time.perf_counter()
            for u in stage.prelude if stage.loop else stage.units:
                try:
                    res = run_unit(plan, u, self.insts[(u.node, u.piece)], mb, stage.device)
                    mb = res.collect() if isinstance(res, Stream) else res
                except Exception as exc:
                    raise NodeError(stage.index, u.node, [req.id], exc) from exc
            if stage.loop and stage.loop not in done_loops:
                done_loops.add(stage.loop)
                mb = self._run_loop(stage.loop, mb, deadline)
            t1 = time.perf_counter()
            self.recorder.logs[stage.index].spans.append((t0, t1, self._n, len(mb.items), "loop" if stage.loop else "compute"))
            timings[f"stage{stage.index}"] = timings.get(f"stage{stage.index}", 0.0) + t1 - t0
        keys = sorted(set(plan.outputs.values()))
        return [(m, {k: row(mb.values[k], i) for k in keys if k in mb.values}) for i, m in enumerate(mb.items)]

    def _run_loop(self, node: str, mb: MicroBatch, deadline: float) -> MicroBatch:
        """The whole loop for the items of ``mb``; returns them with the loop's outputs."""
        plan = self.plan
        stages: list[Stage] = [s for s in plan.stages if s.loop == node]
        bodies = [LoopBody(s.loop_unit, self.insts[(node, s.loop_unit.piece)], s.device) for s in stages]  # type: ignore[arg-type]
        first, last = bodies[0], bodies[-1]
        ids = [m.request_id for m in mb.items]
        cur = stages[0].index
        try:
            x = node_inputs(plan, node, mb)
            for b, s in zip(bodies, stages):
                cur = s.index
                b.enter(x, mb.items)
            first_inst: LoopKind = first.inst
            carry = first_inst.begin(to_device(x, first.device), mb.items)
            active = list(range(len(mb.items)))
            finished: dict[int, dict[str, Any]] = {}
            while active:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"loop {node} did not finish within runtime.timeout_s")
                items = [mb.items[i] for i in active]
                for b, s in zip(bodies, stages):
                    cur = s.index
                    carry = b.step(carry, items)
                carry, done, outs = last.inst.end(carry, items, last.lanes_for(items))
                carry, active = retire_done(plan, node, bodies, carry, items, active, done, outs, finished)
        except Exception as exc:
            for b in bodies:
                b.finish(list(mb.items))
            raise NodeError(cur, node, ids, exc) from exc
        loop_vals = rows_to_batch(plan, mb.items, [finished[i] for i in range(len(mb.items))])
        mb.values.update(loop_vals.values)
        return mb
