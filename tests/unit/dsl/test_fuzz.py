"""Fuzzing the loader and the compiler: any input gives a plan or a RecipeError, nothing else.

Random mutations of the shipped recipes (values replaced by values of other types,
keys deleted, renamed or added, nodes rewired) go through the compiler; random
YAML documents go through the loader (Hydra compose included). 2,000+ examples in
all (``MMPIPE_FUZZ_EXAMPLES`` scales both).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmpipe.api import compile
from mmpipe.dsl.errors import RecipeError
from mmpipe.dsl.load import load_recipe, shipped_recipes

SCALE = float(os.environ.get("MMPIPE_FUZZ_EXAMPLES", "1"))
COMPILER_EXAMPLES = int(1600 * SCALE)
LOADER_EXAMPLES = int(400 * SCALE)

_BASE: dict[str, Any] = {}


def base(name: str) -> dict[str, Any]:
    """A shipped recipe, composed once, as plain data."""
    if name not in _BASE:
        from omegaconf import OmegaConf

        _BASE[name] = OmegaConf.to_container(load_recipe(name).cfg, resolve=True)
    return _BASE[name]


values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["inputs.x", "chain.y", "???", "cpu", "cuda:3", "rank1", "${nope}", "a.b.c", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def paths(d: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(d, dict):
        for k, v in d.items():
            out += paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += paths(v, prefix + (i,))
    return out


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    import copy

    cfg = copy.deepcopy(base(draw(st.sampled_from(sorted(shipped_recipes())))))
    for _ in range(draw(st.integers(1, 4))):
        ps = paths(cfg)
        p = draw(st.sampled_from(ps))
        parent = cfg
        for k in p[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["set", "set", "delete", "add", "rename"]))
        last = p[-1]
        if op == "set":
            parent[last] = draw(values)
        elif op == "delete":
            del parent[last]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(values)
        elif op == "rename" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = parent.pop(last)
    return cfg


@settings(max_examples=COMPILER_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(mutated())
def test_compiler_gives_a_plan_or_recipe_errors(cfg: dict[str, Any]) -> None:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        dc = OmegaConf.create(cfg)
    except (OmegaConfBaseException, ValueError, TypeError):
        return  # not even a config: nothing of ours is reached
    try:
        plan = compile(dc)
    except RecipeError as e:
        assert e.problems and all(p.message for p in e.problems)
        return
    assert plan.num_stages >= 1


documents = st.recursive(
    st.none() | st.integers() | st.text(max_size=10) | st.booleans(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["defaults", "name", "nodes", "inputs", "outputs", "source", "placement", "runtime", "batching", "kind", "in",
                         "chain", "x", "split", "parts", "_target_", "allow_targets", "output_dir", "seed"]) | st.text(max_size=6),
        inner, max_size=5),
    max_leaves=12,
)


@settings(max_examples=LOADER_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.one_of(documents.map(lambda d: yaml.safe_dump(d)), st.text(max_size=200)))
def test_loader_gives_a_plan_or_recipe_errors(text: str) -> None:
    from mmpipe.dsl.compile import compile_loaded

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_text(text)
        try:
            compile_loaded(load_recipe(str(path)))
        except RecipeError as e:
            assert e.problems


def test_fuzzing_runs_enough_examples() -> None:
    if SCALE < 1:
        pytest.skip("scaled down by MMPIPE_FUZZ_EXAMPLES")
    assert COMPILER_EXAMPLES + LOADER_EXAMPLES >= 2000
