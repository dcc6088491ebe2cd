"""Profiled times are seconds per micro-batch: a loop part's time is its iterations' wall
time, and one timed micro-batch counts once (a sampled mutation session changed both
unseen)."""
from __future__ import annotations

from mmpipe.api import requests_of
from mmpipe.runtime.profile import measure
from tests.unit.runtime.test_profile import LOOPY, profile_plan


def test_one_timed_micro_batch_of_sleeping_parts() -> None:
    plan = profile_plan("synthetic", ["stages=2", "work=sleep", "stage_ms=40", "requests=4"])
    prof = measure(plan, requests_of(plan), microbatches=1, warmup=1)
    times = [p.time_s for p in prof.nodes["chain"].parts]
    assert all(0.035 <= t < 0.4 for t in times), times  # one 40 ms sleep per micro-batch


def test_loop_parts_time_their_iterations(write_recipe) -> None:
    path = write_recipe(LOOPY)
    plan = profile_plan(str(path), [])
    prof = measure(plan, requests_of(plan), microbatches=1, warmup=1)
    nc = prof.nodes["body"]
    # no-op iterations take microseconds: a part's time per micro-batch is far below a second
    assert all(0 < p.time_s < 0.25 for p in nc.parts), [p.time_s for p in nc.parts]
