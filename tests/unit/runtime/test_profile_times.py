"""Profiled times are seconds per micro-batch: a loop part's time is its iterations' wall
time, and one timed micro-batch counts once (a sampled mutation session changed both
unseen)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from mmpipe.api import requests_of
from mmpipe.runtime.profile import measure
from tests.unit.runtime.test_profile import profile_plan


def test_one_timed_micro_batch_of_sleeping_parts() -> None:
    plan = profile_plan("synthetic", ["stages=2", "work=sleep", "stage_ms=40", "requests=4"])
    prof = measure(plan, requests_of(plan), microbatches=1, warmup=1)
    times = [p.time_s for p in prof.nodes["chain"].parts]
    assert all(0.035 <= t < 0.4 for t in times), times  # one 40 ms sleep per micro-batch


# The loop clamps every trip count to LOOP_TRIPS (the source draws 1..50), so each micro-batch's
# group runs exactly LOOP_TRIPS iterations, and each iteration sleeps STEP_MS in each piece.
LOOP_TRIPS, STEP_MS = 6, 20
SLEEPY_LOOP = f"""
        defaults: [{{placement: cpu}}, {{runtime: threads}}, _self_]
        name: sleepy_loop
        inputs: {{x: {{type: tensor}}, trips: {{type: tensor}}}}
        outputs: {{y: body.y}}
        source: {{kind: synthetic.requests, count: 6, width: 4, max_trips: 50}}
        nodes:
          body: {{kind: synthetic.loop, in: {{x: inputs.x, trips: inputs.trips}}, parts: 2, split: 2, work: sleep,
                  stage_ms: {STEP_MS}, max_trips: {LOOP_TRIPS}}}
        runtime: {{microbatch_size: 3}}
        batching: {{max_batch_size: 8}}
        """


def test_loop_parts_time_their_iterations(write_recipe: Callable[..., Path]) -> None:
    """A loop piece's time is one iteration's: about one STEP_MS sleep, not the micro-batch's
    LOOP_TRIPS of them (nor a share per item, nor nothing)."""
    plan = profile_plan(str(write_recipe(SLEEPY_LOOP)), [])
    prof = measure(plan, requests_of(plan), microbatches=1, warmup=1)
    nc = prof.nodes["body"]
    assert nc.iterations_per_mb == LOOP_TRIPS  # the premise: a per-micro-batch time would be 6x the sleep
    times = [p.time_s for p in nc.parts]
    assert len(times) == 2, times
    # a generous band (this machine is noisy), still far from 0 and from 6 sleeps (0.12 s)
    assert all(0.8 * STEP_MS / 1000 <= t <= 3 * STEP_MS / 1000 for t in times), times


CHAIN_THEN_LOOP = """
        defaults: [{placement: cpu}, {runtime: threads}, _self_]
        name: chain_then_loop
        inputs: {x: {type: tensor}, trips: {type: tensor}}
        outputs: {y: body.y}
        source: {kind: synthetic.requests, count: 6, width: 4, max_trips: 4}
        nodes:
          pre: {kind: synthetic.chain, in: {x: inputs.x}, parts: 2, split: 2, work: noop}
          body: {kind: synthetic.loop, in: {x: pre.y, trips: inputs.trips}, parts: 2, split: 2, work: noop}
        runtime: {microbatch_size: 3}
        batching: {max_batch_size: 6}
        """


def test_the_wide_group_starts_at_the_loop(write_recipe: Callable[..., Path], monkeypatch) -> None:
    """The group as large as batching allows only samples loop iterations, from the loop inputs
    the earlier micro-batches made: the pieces before the loop do not run for it again."""
    import mmpipe.runtime.profile as profile

    calls: list[str] = []
    groups: list[int] = []
    real, real_loop = profile.run_unit, profile.Profiler.run_loop

    def counting(plan, unit, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(unit.node)
        return real(plan, unit, *args, **kwargs)

    def loop(self, node, mb):  # type: ignore[no-untyped-def]
        groups.append(len(mb.items))
        return real_loop(self, node, mb)

    monkeypatch.setattr(profile, "run_unit", counting)
    monkeypatch.setattr(profile.Profiler, "run_loop", loop)
    plan = profile_plan(str(write_recipe(CHAIN_THEN_LOOP)), [])
    measure(plan, requests_of(plan), microbatches=1, warmup=1)
    assert groups == [3, 3, 6]  # warm-up, timed, and the wide group
    assert calls.count("pre") == 2 * 2  # 2 pieces x (warm-up + timed), none for the wide group
