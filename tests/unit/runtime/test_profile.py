"""Measuring a profile, the timeline data of a run, and the pictures drawn from them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmpipe.api import requests_of
from mmpipe.dsl.compile import compile_loaded, compile_recipe
from mmpipe.dsl.costs import load_profile
from mmpipe.dsl.load import load_recipe
from mmpipe.runtime.pipeline import Pipeline
from mmpipe.runtime.profile import format_profile, measure, nbytes

PNG = b"\x89PNG\r\n\x1a\n"


def profile_plan(recipe: str, overrides: list[str]):
    return compile_loaded(load_recipe(recipe, overrides), mode="profile")


def test_parts_weights_and_boundary_bytes() -> None:
    plan = profile_plan("synthetic", ["stages=3", "nodes.chain.split=1", "work=matmul", "dim=32", "width=16", "requests=5"])
    prof = measure(plan, requests_of(plan), microbatches=2)
    nc = prof.nodes["chain"]
    assert nc.num_parts == 3 and len(nc.parts) == 3 and not nc.loop
    assert all(p.time_s > 0 and p.cpu_s >= 0 for p in nc.parts)
    assert all(p.param_bytes == 32 * 32 * 4 for p in nc.parts)  # each piece holds its matmul weight
    assert all(p.out_bytes == 4 * 16 * 4 for p in nc.parts)  # a micro-batch of 4: [4, 16] float32 handed on
    assert nc.items_per_mb == 4 and nc.in_bytes == 4 * 16 * 4
    assert prof.key.recipe == "synthetic" and prof.key.microbatch_size == 4 and prof.key.device == "cpu"
    assert "estimate" in prof.memory_method and prof.microbatches == 2
    assert "chain" in format_profile(prof)


# a loop with random trips per item (also used by test_profile_times.py)
LOOPY = """
        defaults: [{placement: cpu}, {runtime: threads}, _self_]
        name: loopy
        inputs: {x: {type: tensor}, trips: {type: tensor}}
        outputs: {y: body.y}
        source: {kind: synthetic.requests, count: 6, width: 4, max_trips: 5}
        nodes:
          body: {kind: synthetic.loop, in: {x: inputs.x, trips: inputs.trips}, parts: 2, split: 2, work: noop}
        runtime: {microbatch_size: 3}
        batching: {max_batch_size: 8}
        """


def test_loops_count_iterations_per_item(write_recipe, tmp_path: Path) -> None:
    path = write_recipe(LOOPY)
    plan = profile_plan(str(path), [])
    reqs = requests_of(plan)
    lines: list[str] = []
    prof = measure(plan, reqs, microbatches=1, warmup=1, log=lines.append)
    nc = prof.nodes["body"]
    timed = [int(r.values["trips"]) for r in reqs[3:6]]  # the second micro-batch is the timed one
    # then one group as large as batching allows (6 requests here): it only adds group sizes to the fit
    assert any("a group of 6" in line for line in lines), lines
    assert nc.loop and sorted(nc.trip_counts) == sorted(timed)
    assert nc.iterations_per_mb == max(timed) and nc.trips_per_item == pytest.approx(sum(timed) / 3)
    assert nc.parts[0].out_bytes > 0 and nc.parts[1].out_bytes == 0  # the carry goes from piece 0 to piece 1
    # the group shrinks as items finish: the mean group size over the timed iterations
    sizes = [sum(1 for t in timed if t > k) for k in range(max(timed))]
    assert nc.group_items == pytest.approx(sum(sizes) / len(sizes))
    saved = prof.save(tmp_path / "p.json")
    assert load_profile(saved).nodes["body"].trip_counts == nc.trip_counts


def test_a_loops_cost_per_item_is_a_least_squares_slope() -> None:
    from mmpipe.runtime.profile import slope

    assert slope([(4, 0.4), (3, 0.3), (2, 0.2), (1, 0.1)]) == pytest.approx(0.1)
    assert slope([(2, 0.25), (2, 0.35), (1, 0.2)]) == pytest.approx(0.1)
    assert slope([(4, 0.5), (4, 0.4)]) == 0.0  # one group size: no slope
    assert slope([(2, 0.1), (1, 0.2)]) == 0.0  # faster with more items: noise, not a cost


def test_profiling_needs_one_piece_per_part() -> None:
    plan = compile_recipe("synthetic", ["stages=4", "nodes.chain.split=2", "requests=2"])
    with pytest.raises(ValueError, match="one piece per part"):
        measure(plan, requests_of(plan), microbatches=1)


def test_nbytes_counts_each_storage_once() -> None:
    t = torch.zeros(10, 4)
    assert nbytes({"a": t, "b": [t, t[1:]], "c": (torch.zeros(3, dtype=torch.int64), "text")}) == 160 + 24


def test_timeline_data_and_pictures(tmp_path: Path) -> None:
    from mmpipe.runtime.draw import profile_chart, timeline_path, timeline_png

    plan = compile_recipe("synthetic", ["stages=3", "stage_ms=2", "requests=12"])
    with Pipeline(plan) as pipe:
        pipe.run(requests_of(plan))
        data = pipe.recorder.timeline()
    assert [(r["stage"], r["replica"]) for r in data["rows"]] == [(0, 0), (1, 0), (2, 0)]
    spans = [s for r in data["rows"] for s in r["spans"]]
    assert len(spans) == 9 and min(s[0] for s in spans) == 0.0 and data["end"] == max(s[1] for s in spans)
    for r in data["rows"]:  # a worker's spans do not overlap
        assert all(a[1] <= b[0] + 1e-9 for a, b in zip(r["spans"], r["spans"][1:]))
    png = timeline_png(data, timeline_path(tmp_path / "run.trace.json"), title="synthetic")
    assert png.name == "run.timeline.png" and png.read_bytes()[:8] == PNG
    prof = measure(profile_plan("synthetic", ["stages=3", "stage_ms=1", "requests=4"]), requests_of(plan)[:4], microbatches=1)
    chart = profile_chart(prof, plan, tmp_path / "profile.png")
    assert chart.read_bytes()[:8] == PNG
