"""Transparency: any plan, any split, any micro-batch size -> the sequential results.

Random graphs of synthetic chains and pipelined loops (with per-item trip
counts), wired to earlier nodes (edges that skip stages), optionally behind a
node that expands items, some nodes running as several copies (replicas), some
loops running the node before them in their first stage (with_previous), run
with random batching; every request must equal the sequential oracle's, bit
for bit.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.runtime.helpers import KINDS, assert_same_results, compile_data, oracle, recipe, requests_of, run_pipeline

MAX_STAGES = 6
# 50 keeps the suite fast; MMPIPE_HYPOTHESIS_EXAMPLES=500 for a deeper hunt.
EXAMPLES = int(os.environ.get("MMPIPE_HYPOTHESIS_EXAMPLES", "50"))


@st.composite
def graphs(draw: st.DrawFn) -> dict[str, Any]:
    """A recipe (as data) with 1-6 stages."""
    nodes: dict[str, Any] = {}
    sources = ["inputs.x"]
    has_loop = False
    used = 0
    if draw(st.booleans()) and draw(st.booleans()):  # a quarter of the graphs fan out first (some lazily)
        fan = draw(st.sampled_from(["Fanout", "StreamFanout"]))
        nodes["fan"] = {"_target_": f"{KINDS}.{fan}", "in": {"x": "inputs.x"}, "max_copies": 3}
        sources.append("fan.y")
        used = 1
    n_nodes = draw(st.integers(1, 4))
    for i in range(n_nodes):
        left = MAX_STAGES - used - (n_nodes - i - 1)
        if left <= 0:
            break
        split = draw(st.integers(1, min(3, left)))
        parts = draw(st.integers(split, split + 2))
        costs = draw(st.lists(st.sampled_from([1.0, 2.0, 3.0]), min_size=parts, max_size=parts))
        loop = draw(st.booleans())
        src = draw(st.sampled_from(sources))
        name = f"n{i}"
        node: dict[str, Any] = {"kind": "synthetic.loop" if loop else "synthetic.chain", "in": {"x": src},
                                "parts": parts, "split": split, "work": "noop", "costs": costs}
        if loop:
            node["in"]["trips"] = "inputs.trips"
            has_loop = True
        if draw(st.integers(0, 3)) == 0:
            node["replicas"] = draw(st.integers(2, 3))  # copies of the node's stages, chosen per request
        before = nodes.get(f"n{i - 1}")
        if loop and before is not None and before["kind"] == "synthetic.chain" and "replicas" not in node and "replicas" not in before:
            node["with_previous"] = draw(st.booleans())  # the loop's first stage runs the chain's last piece
        nodes[name] = node
        sources.append(f"{name}.y")
        used += split
    outputs = {"last": sources[-1]}
    for extra in draw(st.lists(st.sampled_from(sources), max_size=2, unique=True)):
        outputs[extra.replace(".", "_")] = extra
    for name, node in nodes.items():
        if node.get("kind") == "synthetic.loop" and draw(st.booleans()):
            outputs[f"{name}_n"] = f"{name}.n"
    mb = draw(st.integers(1, 8))
    return recipe(
        nodes, outputs, count=draw(st.integers(1, 32)), max_trips=draw(st.integers(1, 4)) if has_loop else 0,
        batching={"max_batch_size": mb + draw(st.integers(0, 4)), "max_delay_ms": 1},
        runtime={"microbatch_size": mb, "queue_depth": draw(st.integers(1, 3)), "max_inflight": draw(st.integers(0, 3))},
    )


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(graphs())
def test_pipeline_equals_sequential(data: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        plan = compile_data(Path(tmp), data)
    assert 1 <= plan.num_stages <= MAX_STAGES
    reqs = requests_of(plan)
    out, _ = run_pipeline(plan, reqs)
    assert_same_results(oracle(plan, reqs), out)


@pytest.mark.parametrize("mb", [1, 3, 8])
def test_skip_edges_and_loop(tmp_path: Path, mb: int) -> None:
    """A fixed plan exercising every routing path: skip edges into, around and out of a loop."""
    nodes = {
        "a": {"kind": "synthetic.chain", "in": {"x": "inputs.x"}, "parts": 2, "split": 2, "work": "noop"},
        "b": {"kind": "synthetic.loop", "in": {"x": "a.y", "trips": "inputs.trips"}, "parts": 3, "split": 3, "work": "noop"},
        "c": {"kind": "synthetic.chain", "in": {"x": "a.y"}, "parts": 1, "work": "noop"},
    }
    data = recipe(nodes, {"y": "c.y", "loop": "b.y", "n": "b.n", "x": "a.y"}, count=21, max_trips=5,
                  batching={"max_batch_size": 8}, runtime={"microbatch_size": mb, "max_inflight": 2})
    plan = compile_data(tmp_path, data)
    assert plan.consumers["a.y"] == [2, 3, 4, 5, 6]  # every loop stage, the stage after it, the outputs
    reqs = requests_of(plan)
    out, _ = run_pipeline(plan, reqs)
    assert_same_results(oracle(plan, reqs), out)


@pytest.mark.parametrize("mb,split", [(1, 3), (3, 1), (8, 2)])
def test_a_loop_that_takes_in_the_stage_before_it(tmp_path: Path, mb: int, split: int) -> None:
    """``with_previous``: a's last piece runs in the loop's first stage as items enter; what it
    makes reaches the other loop stages, a later node and the outputs through side stores."""
    nodes = {
        "a": {"kind": "synthetic.chain", "in": {"x": "inputs.x"}, "parts": 2, "split": 2, "work": "noop"},
        "b": {"kind": "synthetic.loop", "in": {"x": "a.y", "trips": "inputs.trips"}, "parts": 3, "split": split, "work": "noop",
              "with_previous": True},
        "c": {"kind": "synthetic.chain", "in": {"x": "a.y"}, "parts": 1, "work": "noop"},
    }
    data = recipe(nodes, {"y": "c.y", "loop": "b.y", "n": "b.n", "x": "a.y"}, count=21, max_trips=5,
                  batching={"max_batch_size": 8}, runtime={"microbatch_size": mb, "max_inflight": 2})
    plan = compile_data(tmp_path, data)
    assert [u.node for u in plan.stages[1].units] == ["a", "b"] and plan.loops[0].stages[0] == 1
    reqs = requests_of(plan)
    out, stats = run_pipeline(plan, reqs)
    assert_same_results(oracle(plan, reqs), out)
    assert stats["loops"]["b"]["joined_items"] > 0 or mb == 8  # items joined running groups: their prelude ran then


def test_replicas_share_the_work_and_keep_loops_on_their_copy(tmp_path: Path) -> None:
    """Two copies of a split chain, two of a split loop, three of a chain read across the
    loop: every copy works, results equal the oracle, no lane or stored value is left."""
    nodes = {
        "a": {"kind": "synthetic.chain", "in": {"x": "inputs.x"}, "parts": 2, "split": 2, "work": "noop", "replicas": 2},
        "b": {"kind": "synthetic.loop", "in": {"x": "a.y", "trips": "inputs.trips"}, "parts": 3, "split": 3, "work": "noop", "replicas": 2},
        "c": {"kind": "synthetic.chain", "in": {"x": "a.y"}, "parts": 1, "work": "noop", "replicas": 3},
    }
    data = recipe(nodes, {"y": "c.y", "loop": "b.y", "n": "b.n"}, count=24, max_trips=5,
                  batching={"max_batch_size": 4}, runtime={"microbatch_size": 2})
    plan = compile_data(tmp_path, data)
    assert [len(s.places) for s in plan.stages] == [2, 2, 2, 2, 2, 3]
    reqs = requests_of(plan)
    out, stats = run_pipeline(plan, reqs)
    assert_same_results(oracle(plan, reqs), out)
    calls = {(s["stage"], s["replica"]): s["calls"] for s in stats["stages"]}
    assert all(n > 0 for n in calls.values()), calls  # least-loaded dispatch used every copy
    # a loop group never leaves its copy: each copy's body stages made the same number of steps
    for r in (0, 1):
        assert calls[(2, r)] == calls[(3, r)] == calls[(4, r)]


def test_a_streamed_expansion_is_made_as_the_pipeline_takes_it(tmp_path: Path) -> None:
    """One request becomes 50 items made one at a time: while the stage after is held shut,
    only a queue's worth is made (bounded memory); then all 50 arrive, in order."""
    from tests.unit.runtime import kinds
    from mmpipe.runtime.pipeline import Pipeline

    kinds.Gate.open.clear()
    kinds.Gate.entered.clear()
    kinds.LongStream.made = 0
    nodes = {"long": {"_target_": f"{KINDS}.LongStream", "in": {"x": "inputs.x"}, "rows": 50},
             "gate": {"_target_": f"{KINDS}.Gate", "in": {"x": "long.y"}}}
    plan = compile_data(tmp_path, recipe(nodes, {"y": "gate.y"}, count=1, runtime={"microbatch_size": 1, "queue_depth": 1}))
    with Pipeline(plan) as pipe:
        fut = pipe.submit(requests_of(plan)[0])
        try:
            assert kinds.Gate.entered.wait(10)
            time.sleep(0.2)  # a stream that ran ahead would be far along by now
            assert kinds.LongStream.made <= 4, kinds.LongStream.made  # gate 1 + inbox 1 + the one waiting to go
        finally:
            kinds.Gate.open.set()
        res = fut.result(timeout=30)
    assert res.ok and kinds.LongStream.made == 50
    ys = res.outputs["y"]
    assert len(ys) == 50 and [float(y[0] - ys[0][0]) for y in ys] == [float(k) for k in range(50)]
