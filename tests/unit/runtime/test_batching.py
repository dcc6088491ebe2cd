"""The batching policy: size, delay, length buckets; and what the pipeline does with it."""
from __future__ import annotations

from pathlib import Path

import torch

from mmpipe.graphs.base import Request
from mmpipe.runtime.batching import BatchPolicy, default_length
from mmpipe.runtime.pipeline import Pipeline
from tests.unit.runtime import kinds
from tests.unit.runtime.helpers import KINDS, assert_same_results, compile_data, oracle, recipe, requests_of


def req(i: int, length: float | None = None) -> Request:
    return Request(id=f"r{i}", values={"x": torch.zeros(3)}, params={} if length is None else {"length": length})


def ids(batches: list[list[Request]]) -> list[list[str]]:
    return [[r.id for r in b] for b in batches]


def test_a_full_batch_leaves_at_once_cut_into_micro_batches():
    pol = BatchPolicy(max_batch_size=4, max_delay_ms=100, microbatch_size=2)
    assert pol.add(req(0), 0.0) == [] and pol.add(req(1), 0.0) == [] and pol.add(req(2), 0.0) == []
    assert ids(pol.add(req(3), 0.0)) == [["r0", "r1"], ["r2", "r3"]]
    assert pol.pending() == 0 and pol.next_deadline() is None


def test_a_partial_batch_leaves_after_max_delay():
    pol = BatchPolicy(max_batch_size=8, max_delay_ms=10, microbatch_size=3)
    for i in range(4):
        pol.add(req(i), 1.0 + i * 0.001)
    assert pol.poll(1.009) == []
    assert pol.next_deadline() == 1.01
    assert ids(pol.poll(1.0101)) == [["r0", "r1", "r2"], ["r3"]]


def test_flush_sends_everything_waiting():
    pol = BatchPolicy(max_batch_size=8, max_delay_ms=1000, microbatch_size=8)
    pol.add(req(0), 0.0)
    assert ids(pol.flush()) == [["r0"]] and pol.flush() == []


def test_micro_batch_size_is_capped_by_max_batch_size():
    assert BatchPolicy(max_batch_size=2, max_delay_ms=0, microbatch_size=8).microbatch_size == 2


def test_length_buckets_keep_similar_lengths_together():
    pol = BatchPolicy(max_batch_size=3, max_delay_ms=50, microbatch_size=3, length_buckets=[10, 30])
    lengths = [5, 25, 100, 8, 12, 40, 3]
    out = []
    for i, n in enumerate(lengths):
        out += pol.add(req(i, n), 0.0)
    assert ids(out) == [["r6", "r0", "r3"]]  # bucket <=10 filled first, sorted by length
    assert pol.bucket_of(10) == 0 and pol.bucket_of(10.5) == 1 and pol.bucket_of(31) == 2
    rest = ids(pol.flush())
    assert rest == [["r4", "r1"], ["r5", "r2"]]


def test_lengths_come_from_params_or_the_hook():
    assert default_length(req(0, 7.5)) == 7.5
    assert default_length(Request(id="a", values={"x": torch.zeros(2, 5), "path": "a.wav"})) == 10
    pol = BatchPolicy(max_batch_size=2, max_delay_ms=0, microbatch_size=2, length_buckets=[1], length_of=lambda r: len(r.id))
    out = pol.add(Request(id="a", values={}), 0.0) + pol.add(Request(id="bb", values={}), 0.0) + pol.add(Request(id="c", values={}), 0.0)
    assert ids(out) == [["a", "c"]]


def test_pipeline_batches_by_length_bucket(tmp_path: Path):
    kinds.Counted.calls = []
    nodes = {"a": {"_target_": f"{KINDS}.Counted", "in": {"x": "inputs.x"}},
             "b": {"kind": "synthetic.chain", "in": {"x": "a.y"}, "parts": 1, "work": "noop"}}
    plan = compile_data(tmp_path, recipe(nodes, {"y": "b.y"}, count=24,
                                         batching={"max_batch_size": 4, "length_buckets": [10]}, runtime={"microbatch_size": 2}))
    reqs = requests_of(plan)
    for i, r in enumerate(reqs):
        r.params["length"] = 5 if i % 3 else 50
    short = {r.id for r in reqs if r.params["length"] == 5}
    with Pipeline(plan) as pipe:
        res = pipe.run(reqs)
    calls = list(kinds.Counted.calls)
    assert_same_results(oracle(plan, reqs), res)
    assert sum(len(c) for c in calls) == 24
    for call in calls:
        assert len(call) <= 2
        assert len({rid in short for rid in call}) == 1  # never a short and a long request together
