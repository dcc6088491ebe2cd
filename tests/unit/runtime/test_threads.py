"""``runtime.threads_per_stage``: each stage worker's own intra-op threads, so stages that
are busy at the same time need not oversubscribe the cores."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from mmpipe.runtime.pipeline import Pipeline
from mmpipe.runtime.sequential import SequentialExecutor
from tests.unit.runtime import kinds
from tests.unit.runtime.helpers import KINDS, assert_same_results, compile_data, recipe, requests_of


def _plan(tmp_path: Path, per_stage: int) -> Any:
    nodes = {"a": {"_target_": f"{KINDS}.Threads", "in": {"x": "inputs.x"}},
             "b": {"kind": "synthetic.loop", "in": {"x": "a.y", "trips": "inputs.trips"}, "parts": 2, "split": 2, "work": "noop"},
             "c": {"_target_": f"{KINDS}.Threads", "in": {"x": "b.y"}}}
    return compile_data(tmp_path, recipe(nodes, {"y": "c.y", "n": "b.n"}, count=8, max_trips=3,
                                         runtime={"microbatch_size": 2, "threads_per_stage": per_stage}))


def _fresh_thread_count() -> int:
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(torch.get_num_threads()))
    t.start()
    t.join()
    return got[0]


@pytest.fixture
def two_threads() -> Any:
    """The process runs with 2 intra-op threads (as this 2-core machine does by default)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_every_stage_worker_runs_with_its_own_thread_count(tmp_path: Path, two_threads: None) -> None:
    plan = _plan(tmp_path, 1)
    reqs = requests_of(plan)
    kinds.Threads.seen.clear()
    with Pipeline(plan) as pipe:
        res = pipe.run(reqs)
        stages = pipe.stats(1.0)["stages"]
        assert torch.get_num_threads() == 2  # the caller keeps its own count
        assert _fresh_thread_count() == 2  # threads set up later start from the process's count again
    assert kinds.Threads.seen and set(kinds.Threads.seen) == {1}
    assert len(stages) == 4 and all(s["threads"] == 1 for s in stages)  # loop body stages too

    kinds.Threads.seen.clear()
    with SequentialExecutor(plan) as ex:  # the oracle runs with the stages' count: same arithmetic
        ref = ex.run(reqs)
        assert all(s["threads"] == 1 for s in ex.stats(1.0)["stages"])
    assert set(kinds.Threads.seen) == {1}
    assert torch.get_num_threads() == 2
    assert_same_results(ref, res)


def test_without_the_option_stages_keep_the_process_count(tmp_path: Path, two_threads: None) -> None:
    plan = _plan(tmp_path, 0)
    kinds.Threads.seen.clear()
    with Pipeline(plan) as pipe:
        pipe.run(requests_of(plan))
        stages = pipe.stats(1.0)["stages"]
    assert set(kinds.Threads.seen) == {2}
    assert all(s["threads"] == 2 for s in stages)


def test_a_negative_count_is_a_recipe_error() -> None:
    from mmpipe.dsl.compile import compile_recipe
    from mmpipe.dsl.errors import RecipeError

    with pytest.raises(RecipeError, match=r"runtime.threads_per_stage: must not be negative"):
        compile_recipe("synthetic", ["runtime.threads_per_stage=-1"])
