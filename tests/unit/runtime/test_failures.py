"""Failures stay local, nothing hangs, no thread outlives the pipeline."""
from __future__ import annotations

import _thread
import threading
import time
from pathlib import Path

import pytest

from mmpipe.dsl.compile import compile_recipe
from mmpipe.graphs.base import Request
from mmpipe.runtime.pipeline import Pipeline
from tests.unit.runtime.helpers import KINDS, assert_same_results, compile_data, oracle, recipe, requests_of, runtime_threads


def check_one_bad(plan, bad: str, stage: int, node: str) -> dict:
    reqs = requests_of(plan)
    with Pipeline(plan) as pipe:
        res = pipe.run(reqs)
        stats = pipe.stats(1.0)
        assert pipe.store_size() == 0, "side-store values of the failed request outlived it"
    failed = [r for r in res if not r.ok]
    assert [r.id for r in failed] == [bad]
    err = failed[0].error
    assert (err["type"], err["stage"], err["node"], err["requests"]) == ("InjectedFailure", stage, node, [bad])
    good = [q for q in reqs if q.id != bad]
    assert_same_results(oracle(plan, good), [r for r in res if r.ok])
    return stats


def test_one_bad_item_among_20_fails_alone():
    plan = compile_recipe("synthetic", ["stages=3", "requests=20", "work=noop", "runtime.microbatch_size=4", "+nodes.chain.fail_ids=[r0007]"])
    check_one_bad(plan, "r0007", stage=0, node="chain")


def test_one_bad_item_in_a_later_stage(tmp_path: Path):
    nodes = {"a": {"kind": "synthetic.chain", "in": {"x": "inputs.x"}, "parts": 2, "split": 2, "work": "noop"},
             "b": {"kind": "synthetic.chain", "in": {"x": "a.y"}, "parts": 1, "work": "noop", "fail_ids": ["r0013"]}}
    plan = compile_data(tmp_path, recipe(nodes, {"y": "b.y"}, count=20, runtime={"microbatch_size": 5}))
    check_one_bad(plan, "r0013", stage=2, node="b")


def test_one_bad_item_inside_a_pipelined_loop(tmp_path: Path):
    nodes = {"a": {"kind": "synthetic.chain", "in": {"x": "inputs.x"}, "parts": 1, "work": "noop"},
             "b": {"kind": "synthetic.loop", "in": {"x": "a.y", "trips": "inputs.trips"}, "parts": 3, "split": 3,
                   "work": "noop", "fail_ids": ["r0004"]}}
    plan = compile_data(tmp_path, recipe(nodes, {"y": "b.y", "n": "b.n"}, count=20, max_trips=4,
                                         runtime={"microbatch_size": 4, "max_inflight": 2}))
    stats = check_one_bad(plan, "r0004", stage=1, node="b")
    assert stats["loops"]["b"]["retried_items"] >= 2  # its group was retried item by item


@pytest.mark.parametrize("where", ["prelude", "loop"])
def test_one_bad_item_in_a_loops_prelude_or_body(tmp_path: Path, where: str):
    """The loop's first stage runs a's last piece as items enter: a failure there, or in the
    loop after it, fails only its request, named by the node that raised."""
    nodes = {"pre": {"kind": "synthetic.chain", "in": {"x": "inputs.x"}, "parts": 1, "work": "noop"},
             "a": {"kind": "synthetic.chain", "in": {"x": "pre.y"}, "parts": 2, "work": "noop"},
             "b": {"kind": "synthetic.loop", "in": {"x": "a.y", "trips": "inputs.trips"}, "parts": 2, "split": 2,
                   "work": "noop", "with_previous": True},
             "c": {"kind": "synthetic.chain", "in": {"x": "a.y"}, "parts": 1, "work": "noop"}}
    nodes["a" if where == "prelude" else "b"]["fail_ids"] = ["r0005"]
    plan = compile_data(tmp_path, recipe(nodes, {"y": "b.y", "n": "b.n", "z": "c.y"}, count=20, max_trips=4,
                                         runtime={"microbatch_size": 4, "max_inflight": 2}))
    assert [u.node for u in plan.stages[1].units] == ["a", "b"]
    stats = check_one_bad(plan, "r0005", stage=1, node="a" if where == "prelude" else "b")
    assert stats["loops"]["b"]["retried_items"] >= 2  # its group was retried item by item


def test_one_bad_item_after_fan_out(tmp_path: Path):
    """An expanded request fails as a whole; its neighbours do not."""
    nodes = {"fan": {"_target_": f"{KINDS}.Fanout", "in": {"x": "inputs.x"}},
             "b": {"kind": "synthetic.chain", "in": {"x": "fan.y"}, "parts": 2, "split": 2, "work": "noop", "fail_ids": ["r0002"]}}
    plan = compile_data(tmp_path, recipe(nodes, {"y": "b.y"}, count=10, runtime={"microbatch_size": 3}))
    check_one_bad(plan, "r0002", stage=1, node="b")


def test_a_malformed_request_fails_at_batching():
    plan = compile_recipe("synthetic", ["stages=2", "requests=6", "work=noop"])
    reqs = requests_of(plan)
    reqs[3] = Request(id="bad", values={"x": "not a tensor"})
    with Pipeline(plan) as pipe:
        res = pipe.run(reqs)
    assert [r.ok for r in res] == [True, True, True, False, True, True]
    assert res[3].error["stage"] == -1 and res[3].error["node"] == "inputs"


def hang_plan(tmp_path: Path, loop: bool) -> object:
    kind = "synthetic.loop" if loop else "synthetic.chain"
    nodes = {"a": {"kind": "synthetic.chain", "in": {"x": "inputs.x"}, "parts": 2, "split": 2, "work": "noop"},
             "b": {"kind": kind, "in": {"x": "a.y", **({"trips": "inputs.trips"} if loop else {})}, "parts": 2, "split": 2,
                   "work": "noop", "hang_ids": ["r0005"], "hang_s": 2.5}}
    return compile_data(tmp_path, recipe(nodes, {"y": "b.y"}, count=12, max_trips=3 if loop else 0,
                                         runtime={"microbatch_size": 2, "timeout_s": 0.5}))


@pytest.mark.parametrize("loop", [False, True])
def test_a_hanging_stage_is_named_and_the_run_ends(tmp_path: Path, loop: bool):
    plan = hang_plan(tmp_path, loop)
    pipe = Pipeline(plan).start()
    t0 = time.monotonic()
    res = pipe.run(requests_of(plan))
    elapsed = time.monotonic() - t0
    pipe.close()
    assert elapsed < plan.runtime["timeout_s"] + 5  # the bound the spec promises, not a speed test
    hung = next(r for r in res if r.id == "r0005")
    assert not hung.ok and hung.error["type"] == "StageTimeout" and hung.error["stage"] == 2
    assert "stage 2" in hung.error["message"] and "made no progress" in hung.error["message"]
    for r in res:
        assert r.ok or r.error["stage"] == 2
    assert runtime_threads() == []


def test_ctrl_c_joins_workers_and_keeps_finished_results():
    plan = compile_recipe("synthetic", ["stages=2", "requests=40", "work=sleep", "stage_ms=20", "runtime.microbatch_size=1"])
    pipe = Pipeline(plan).start()
    seen: list[str] = []

    def progress(r):
        seen.append(r.id)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe.run(requests_of(plan), progress=progress)
    assert runtime_threads() == []
    ok = [r.id for r in pipe.completed if r.ok]
    assert set(seen) <= set(ok) and len(pipe.completed) == 40  # the rest were failed as closed
    assert all(r.error["type"] == "Closed" for r in pipe.completed if not r.ok)


def test_a_real_sigint_while_waiting():
    plan = compile_recipe("synthetic", ["stages=2", "requests=40", "work=sleep", "stage_ms=50", "runtime.microbatch_size=1"])
    pipe = Pipeline(plan).start()
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            pipe.run(requests_of(plan))
    finally:
        timer.join()
    assert runtime_threads() == []
    assert any(not r.ok for r in pipe.completed)


def test_close_resolves_every_future():
    plan = compile_recipe("synthetic", ["stages=2", "requests=16", "work=sleep", "stage_ms=50"])
    pipe = Pipeline(plan).start()
    futures = [pipe.submit(r) for r in requests_of(plan)]
    pipe.close()
    assert all(f.done() for f in futures)
    for f in futures:
        r = f.result()
        assert r.ok or r.error["type"] == "Closed"
    assert any(f.result().error for f in futures)  # closing early left work undone


def test_out_of_memory_retries_smaller_micro_batches(tmp_path: Path):
    """A stage that runs out of memory on 8 items retries halves (4, then 2) and every request succeeds."""
    from tests.unit.runtime import kinds

    kinds.SmallMemory.sizes = []
    nodes = {"a": {"_target_": f"{KINDS}.SmallMemory", "in": {"x": "inputs.x"}, "max_items": 2}}
    plan = compile_data(tmp_path, recipe(nodes, {"y": "a.y"}, count=8, batching={"max_batch_size": 8, "max_delay_ms": 50},
                                         runtime={"microbatch_size": 8}))
    reqs = requests_of(plan)
    with Pipeline(plan) as pipe:
        res = pipe.run(reqs)
    assert all(r.ok for r in res)
    assert_same_results(oracle(plan, reqs), res)
    assert kinds.SmallMemory.sizes[:3] == [8, 4, 2]  # halves, not single items at once
    assert max(kinds.SmallMemory.sizes[3:]) <= 4


def test_one_bad_item_with_micro_batches_of_one(tmp_path: Path):
    """With micro-batch size 1 a failure fails its request with the node's own error
    (a swallowed failure would surface as a StageTimeout instead)."""
    nodes = {"a": {"kind": "synthetic.chain", "in": {"x": "inputs.x"}, "parts": 2, "split": 2, "work": "noop", "fail_ids": ["r0003"]}}
    plan = compile_data(tmp_path, recipe(nodes, {"y": "a.y"}, count=8, runtime={"microbatch_size": 1, "timeout_s": 30}))
    check_one_bad(plan, "r0003", stage=0, node="a")


def test_a_failure_in_a_stage_of_two_nodes_fails_only_its_item(tmp_path: Path):
    """The retry starts again from the values the stage received: the light node before
    the failing one runs again on untouched inputs, so the neighbours succeed."""
    nodes = {"pre": {"_target_": f"{KINDS}.LightAdd", "in": {"x": "inputs.x"}},
             "b": {"kind": "synthetic.chain", "in": {"x": "pre.y"}, "parts": 1, "work": "noop", "fail_ids": ["r0005"]}}
    plan = compile_data(tmp_path, recipe(nodes, {"y": "b.y"}, count=12, runtime={"microbatch_size": 4}))
    assert [[u.node for u in s.units] for s in plan.stages] == [["pre", "b"]]
    check_one_bad(plan, "r0005", stage=0, node="b")


def test_several_bad_items_in_a_loop_fail_only_themselves(tmp_path: Path):
    """Three bad items among 40 in a three-stage loop with groups retried item by item:
    exactly their requests fail (lanes freed by other stages never hit a retried item)."""
    bad = ["r0004", "r0017", "r0030"]
    nodes = {"a": {"kind": "synthetic.chain", "in": {"x": "inputs.x"}, "parts": 1, "work": "noop"},
             "b": {"kind": "synthetic.loop", "in": {"x": "a.y", "trips": "inputs.trips"}, "parts": 3, "split": 3,
                   "work": "noop", "fail_ids": bad}}
    plan = compile_data(tmp_path, recipe(nodes, {"y": "b.y", "n": "b.n"}, count=40, max_trips=4, runtime={"microbatch_size": 4}))
    reqs = requests_of(plan)
    with Pipeline(plan) as pipe:
        res = pipe.run(reqs)
        assert pipe.store_size() == 0
    assert sorted(r.id for r in res if not r.ok) == bad
    assert_same_results(oracle(plan, [q for q in reqs if q.id not in bad]), [r for r in res if r.ok])
