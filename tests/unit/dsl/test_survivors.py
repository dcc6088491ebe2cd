"""Compiler behaviour that a sampled mutation session (``make mutation``) showed no test
pinned down: each test here fails on the mutant named in its docstring."""
from __future__ import annotations

import contextlib
import io
import re

import pytest

from mmpipe.dsl.costs import intra_op_threads


def test_distributed_ranks_share_the_cores() -> None:
    """costs.py: ``cores // nproc`` (mutant: ``cores >> nproc``)."""
    assert intra_op_threads({"backend": "distributed", "nproc": 2}, cores=16) == 8
    assert intra_op_threads({"backend": "distributed", "nproc": 3}, cores=16) == 5
    assert intra_op_threads({"backend": "distributed", "nproc": 32}, cores=16) == 1
    assert intra_op_threads({"backend": "distributed", "nproc": 2, "threads_per_rank": 3}, cores=16) == 3


def test_a_node_with_exactly_max_parts_keeps_its_cost_hints(monkeypatch: pytest.MonkeyPatch) -> None:
    """compile.py: costs are read when ``1 <= n <= MAX_PARTS`` (mutant: ``n < MAX_PARTS``
    drops the hints of a node at the limit, and the cut falls in the wrong place)."""
    from mmpipe.dsl import compile as comp
    from mmpipe.dsl.compile import compile_loaded
    from mmpipe.dsl.load import load_recipe

    monkeypatch.setattr(comp, "MAX_PARTS", 4)
    plan = compile_loaded(load_recipe("synthetic", ["stages=4", "+nodes.chain.costs=[1,1,1,9]", "nodes.chain.split=2"]))
    assert plan.nodes["chain"].pieces == [[0, 3], [3, 4]]  # the heavy last part alone
    plan = compile_loaded(load_recipe("synthetic", ["stages=4", "+nodes.chain.costs=[9,1,1,1]", "nodes.chain.split=2"]))
    assert plan.nodes["chain"].pieces == [[0, 1], [1, 4]]


def test_a_missing_rank_names_the_rank_count_that_fixes_it() -> None:
    """stages.py: the fix says ``runtime.nproc`` = rank + 1 (mutant: rank + 2)."""
    from mmpipe.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["validate", "whisper_stt", "runtime=distributed", "runtime.nproc=2", "placement.decoder=rank4"])
    assert code == 2
    assert "rank 4 does not exist" in err.getvalue() and "raise runtime.nproc to 5 or use rank0..rank1" in err.getvalue()


def test_dot_keeps_the_pieces_of_each_copy_together() -> None:
    """plan.py ``to_dot``: between two pieces of a replicated node, copy k feeds copy k only
    (mutant: comparing the wrong field of the box name crashed or crossed the copies)."""
    from mmpipe.dsl.compile import compile_loaded
    from mmpipe.dsl.load import load_recipe

    plan = compile_loaded(load_recipe("whisper_stt", ["runtime=distributed", "runtime.nproc=2", "nodes.encoder.split=2", "nodes.encoder.replicas=2"]))
    dot = plan.to_dot()
    enc = [s.index for s in plan.stages if any(u.node == "encoder" for u in s.units)]
    assert len(enc) == 2
    a, b = enc
    edges = set(re.findall(r"^\s+(s\d+_\d+) -> (s\d+_\d+)", dot, re.M))
    assert {(f"s{a}_0", f"s{b}_0"), (f"s{a}_1", f"s{b}_1")} <= edges
    assert (f"s{a}_0", f"s{b}_1") not in edges and (f"s{a}_1", f"s{b}_0") not in edges
