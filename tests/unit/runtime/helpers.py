"""Helpers for the runtime tests: recipes from data, the oracle, result comparison."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
import yaml

from mmpipe.api import requests_of
from mmpipe.dsl.compile import compile_recipe
from mmpipe.dsl.plan import Plan
from mmpipe.runtime.pipeline import THREAD_PREFIX, Pipeline
from mmpipe.runtime.results import Result
from mmpipe.runtime.sequential import SequentialExecutor

KINDS = "tests.unit.runtime.kinds"


def recipe(nodes: dict[str, Any], outputs: dict[str, str], *, count: int = 8, max_trips: int = 0, width: int = 4,
           batching: dict[str, Any] | None = None, runtime: dict[str, Any] | None = None) -> dict[str, Any]:
    """A recipe (as data) over the synthetic source and kinds."""
    inputs: dict[str, Any] = {"x": {"type": "tensor"}}
    if max_trips:
        inputs["trips"] = {"type": "tensor"}
    return {
        "defaults": [{"placement": "cpu"}, {"runtime": "threads"}, "_self_"],
        "name": "rt_test", "inputs": inputs, "outputs": outputs,
        "source": {"kind": "synthetic.requests", "count": count, "width": width, "max_trips": max_trips},
        "nodes": nodes, "allow_targets": [KINDS],
        "batching": {"max_batch_size": 8, "max_delay_ms": 1, **(batching or {})},
        "runtime": {"timeout_s": 60, **(runtime or {})},
    }


def compile_data(tmp: Path, data: dict[str, Any], overrides: list[str] | None = None) -> Plan:
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return compile_recipe(str(path), overrides or [])


def oracle(plan: Plan, reqs: list[Any]) -> list[Result]:
    with SequentialExecutor(plan) as ex:
        return ex.run(reqs)


def run_pipeline(plan: Plan, reqs: list[Any]) -> tuple[list[Result], dict[str, Any]]:
    with Pipeline(plan) as pipe:
        res = pipe.run(reqs)
        assert pipe.store_size() == 0, "side-store values outlived their requests"
        return res, pipe.stats(1.0)


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return bool(a == b)


def assert_same_results(ref: list[Result], out: list[Result]) -> None:
    """Request by request: same id, same success, bit-identical outputs."""
    assert [r.id for r in out] == [r.id for r in ref]
    for r, o in zip(ref, out):
        assert r.ok, r.error
        assert o.ok, o.error
        assert same_value(r.outputs, o.outputs), f"{r.id}: {r.outputs} != {o.outputs}"


def runtime_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX) and t.is_alive()]


__all__ = ["recipe", "compile_data", "oracle", "run_pipeline", "assert_same_results", "requests_of", "runtime_threads"]
