"""Device transfers: the CPU stand-in here, the CUDA side-stream path where a GPU exists."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmpipe.runtime.transfer import Mover, wait_ready
from tests.unit.runtime.helpers import assert_same_results, compile_data, oracle, recipe, requests_of, run_pipeline


def test_same_device_is_free():
    v = {"a": torch.ones(2), "s": ["x"]}
    out, ev = Mover("cpu", "cpu").move(v)
    assert out is v and ev is None


def test_cpu_stand_in_moves_nested_values():
    v = {"a": torch.ones(2), "n": {"b": [torch.zeros(1), "keep"]}}
    out, ev = Mover("cpu", "meta").move(v)
    assert ev is None
    assert out["a"].device.type == "meta" and out["n"]["b"][0].device.type == "meta" and out["n"]["b"][1] == "keep"
    wait_ready(None, "meta")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_round_trip_on_a_side_stream():
    x = torch.arange(1 << 20, dtype=torch.float32)
    to_gpu, ev = Mover("cpu", "cuda:0").move({"x": x})
    assert ev is not None
    wait_ready(ev, "cuda:0")
    y = to_gpu["x"] * 2
    back, ev2 = Mover("cuda:0", "cpu").move({"y": y})
    wait_ready(ev2, "cpu")
    assert back["y"].device.type == "cpu" and back["y"].is_pinned() and torch.equal(back["y"], x * 2)


@cuda
@pytest.mark.parametrize("mb", [1, 4])
def test_pipeline_across_cpu_and_gpu_equals_sequential(tmp_path: Path, mb: int):
    nodes = {"a": {"kind": "synthetic.chain", "in": {"x": "inputs.x"}, "parts": 3, "split": 3, "work": "noop"},
             "b": {"kind": "synthetic.loop", "in": {"x": "a.y", "trips": "inputs.trips"}, "parts": 2, "split": 2, "work": "noop"},
             "c": {"kind": "synthetic.chain", "in": {"x": "inputs.x"}, "parts": 1, "work": "noop"}}
    data = recipe(nodes, {"y": "b.y", "c": "c.y", "a": "a.y"}, count=20, max_trips=4, runtime={"microbatch_size": mb})
    data["placement"] = {"a.1": "cuda:0", "b.0": "cuda:0", "c": "cuda:0"}
    plan = compile_data(tmp_path, data)
    assert plan.transfers
    reqs = requests_of(plan)
    out, stats = run_pipeline(plan, reqs)
    ref = oracle(plan, reqs)
    for r in ref + out:  # compare on the CPU
        r.outputs = {k: v.cpu() for k, v in r.outputs.items()}
    assert_same_results(ref, out)
    assert any(s["transfer_s"] > 0 for s in stats["stages"])
