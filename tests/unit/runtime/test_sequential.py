"""The sequential reference executor: exact results, loops, fan-out, failures."""
from __future__ import annotations

import torch

from mmpipe.dsl.compile import compile_recipe
from mmpipe.graphs.synthetic import _part_coeffs
from mmpipe.runtime.sequential import SequentialExecutor
from tests.conftest import make_requests

LOOP = """
defaults:
  - runtime: sequential
  - _self_
name: loopy
inputs: {x: {type: tensor}, trips: {type: int}}
outputs: {y: post.y, n: body.n, pre: pre.y}
source: {kind: synthetic.requests, count: 6, max_trips: 5}
nodes:
  pre: {kind: synthetic.chain, in: {x: inputs.x}, parts: 2, split: 2, work: noop}
  body: {kind: synthetic.loop, in: {x: pre.y, trips: inputs.trips}, parts: 3, split: 3, work: noop}
  post: {kind: synthetic.chain, in: {x: body.y}, parts: 1, work: noop}
"""


def expected_chain(x: torch.Tensor, parts: range) -> torch.Tensor:
    for p in parts:
        a, b = _part_coeffs(p)
        x = x * a + b
    return x


def test_chain_results_are_exact():
    plan = compile_recipe("synthetic", ["requests=5", "work=noop", "stages=3"])
    reqs = make_requests(plan)
    with SequentialExecutor(plan) as ex:
        res = ex.run(reqs)
    assert [r.id for r in res] == [r.id for r in reqs]
    for r, q in zip(res, reqs):
        assert torch.equal(r.outputs["y"], expected_chain(q.values["x"], range(3)))
        assert set(r.timings["stages_s"]) == {"stage0", "stage1", "stage2"}


def test_loop_runs_each_item_its_trip_count(write_recipe):
    plan = compile_recipe(str(write_recipe(LOOP)))
    reqs = make_requests(plan)
    res = SequentialExecutor(plan).run(reqs)
    for r, q in zip(res, reqs):
        trips = int(q.values["trips"])
        h = expected_chain(q.values["x"], range(2))
        assert torch.equal(r.outputs["pre"], h)
        for _ in range(trips):
            for p in range(3):
                a, b = _part_coeffs(p)
                h = (h * a + b) * 0.5
        assert int(r.outputs["n"]) == trips
        assert torch.equal(r.outputs["y"], expected_chain(h, range(1)))


def test_a_failing_request_does_not_stop_the_others():
    plan = compile_recipe("synthetic", ["requests=4", "work=noop", "+nodes.chain.fail_ids=[r0002]"])
    res = SequentialExecutor(plan).run(make_requests(plan))
    assert [r.ok for r in res] == [True, True, False, True]
    err = res[2].error
    assert err["node"] == "chain" and err["requests"] == ["r0002"] and err["type"] == "InjectedFailure"
    assert err["stage"] == 0
