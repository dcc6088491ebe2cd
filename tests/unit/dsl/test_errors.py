"""Every kind of recipe mistake is reported, all at once, with file, line and fix."""
from __future__ import annotations

import pytest

from mmpipe.dsl.compile import compile_recipe
from mmpipe.dsl.errors import RecipeError

HEAD = """
defaults:
  - runtime: threads
  - _self_
name: t
inputs: {x: {type: tensor}, trips: {type: int, optional: true}}
outputs: {y: a.y}
source: {kind: synthetic.requests, count: 2}
"""


def problems(write_recipe, body: str, overrides: list[str] | None = None, available=None) -> list:
    p = write_recipe(HEAD + body)
    with pytest.raises(RecipeError) as e:
        compile_recipe(str(p), overrides or [], available=available)
    return e.value.problems


def one(write_recipe, body: str, **kw):
    ps = problems(write_recipe, body, **kw)
    assert len(ps) == 1, [p.format() for p in ps]
    return ps[0]


def test_five_planted_mistakes_in_one_pass(write_recipe):
    ps = problems(write_recipe, """
nodes:
  a:
    kind: synthetic.chain
    in: {x: inputs.x}
    parts: 4
    split: 6
    stage_msec: 3
  b:
    kind: synthetic.chian
    in: {x: a.y}
  c:
    kind: synthetic.chain
    in: {x: aa.y}
    dim: abc
batching: {max_batch_size: 0}
""")
    assert len(ps) == 6
    keys = [p.key for p in ps]
    assert set(keys) == {"batching.max_batch_size", "nodes.a.stage_msec", "nodes.b.kind", "nodes.c.dim", "nodes.c.in.x", "nodes.a.split"}
    for p in ps:
        assert p.where.file and p.where.file.endswith("recipe.yaml") and p.where.line, p.format()
        assert p.fix, p.format()
    by = {p.key: p for p in ps}
    assert "did you mean 'stage_ms'" in by["nodes.a.stage_msec"].fix
    assert "did you mean 'synthetic.chain'" in by["nodes.b.kind"].fix
    assert "did you mean 'a'" in by["nodes.c.in.x"].fix
    text = open(by["nodes.a.split"].where.file).read().splitlines()
    assert text[by["nodes.a.split"].where.line - 1].strip() == "split: 6"


def test_unknown_top_level_key(write_recipe):
    p = one(write_recipe, "nodes: {a: {kind: synthetic.chain, in: {x: inputs.x}}}\nbatchng: {max_batch_size: 2}\n")
    assert p.key == "batchng" and "did you mean 'batching'" in p.fix


def test_wrong_type_and_missing_required(write_recipe):
    ps = problems(write_recipe, "nodes: {a: {kind: synthetic.chain, in: {x: inputs.x}, stage_ms: fast, work: '???'}}\n")
    msgs = {p.key: p.message for p in ps}
    assert "expected a number" in msgs["nodes.a.stage_ms"]
    assert "missing required value" in msgs["nodes.a.work"]


def test_unknown_port_in_wire(write_recipe):
    p = one(write_recipe, "nodes:\n  a: {kind: synthetic.chain, in: {x: inputs.x}}\n  b: {kind: synthetic.chain, in: {x: a.yy}}\n")
    assert p.key == "nodes.b.in.x" and "no output port 'yy'" in p.message and "did you mean 'y'" in p.fix


def test_unknown_input_port(write_recipe):
    p = one(write_recipe, "nodes:\n  a: {kind: synthetic.chain, in: {x: inputs.x, z: inputs.x}}\n")
    assert "no input port 'z'" in p.message


def test_unknown_request_field(write_recipe):
    p = one(write_recipe, "nodes:\n  a: {kind: synthetic.chain, in: {x: inputs.xx}}\n")
    assert "no request input 'xx'" in p.message and "did you mean 'x'" in p.fix


def test_cycle_outside_a_loop(write_recipe):
    p = one(write_recipe, "nodes:\n  a: {kind: synthetic.chain, in: {x: b.y}}\n  b: {kind: synthetic.chain, in: {x: a.y}}\n")
    assert "cycle" in p.message and "a -> b -> a" in p.message


def test_dtype_and_shape_mismatch(write_recipe):
    ps = problems(write_recipe, "nodes:\n  a: {kind: synthetic.chain, in: {x: inputs.x}}\n  l: {kind: synthetic.loop, in: {x: inputs.x, trips: a.y}}\n")
    assert [p.key for p in ps] == ["nodes.l.in.trips"] * 2
    assert "dtype mismatch: a.y is float32" in ps[0].message and "rank mismatch" in ps[1].message


def test_shape_mismatch_of_fixed_dims(write_recipe):
    body = "nodes:\n  a: {kind: synthetic.chain, in: {x: inputs.x}}\n  mel: {kind: audio.log_mel, in: {audio: a.y}}\n  enc: {kind: whisper.encoder, in: {features: mel.features}, model: {n_mels: 80}}\n"
    # 128 mel bins into an encoder for 80: dim 1 mismatch, found before any weights load
    p = one(write_recipe, body, overrides=["+nodes.mel.n_mels=128"])
    assert p.key == "nodes.enc.in.features" and "dim 1 is 128" in p.message


def test_device_not_on_this_machine(write_recipe):
    p = one(write_recipe, "nodes: {a: {kind: synthetic.chain, in: {x: inputs.x}}}\nplacement: {a: 'cuda:7'}\n", available=lambda d: d == "cpu")
    assert p.key == "placement.a" and "not available" in p.message and "placement.a=cpu" in p.fix


def test_placement_of_unknown_piece(write_recipe):
    p = one(write_recipe, "nodes: {a: {kind: synthetic.chain, in: {x: inputs.x}, split: 2}}\nplacement: {a.2: cpu}\n")
    assert "piece 2" in p.message


def test_split_larger_than_parts(write_recipe):
    p = one(write_recipe, "nodes: {a: {kind: synthetic.chain, in: {x: inputs.x}, parts: 3, split: 5}}\n")
    assert p.key == "nodes.a.split" and "at most 3" in p.fix


def test_non_positive_sizes(write_recipe):
    ps = problems(write_recipe, "nodes: {a: {kind: synthetic.chain, in: {x: inputs.x}, split: 0}}\nruntime: {queue_depth: 0, microbatch_size: -1}\n")
    assert {p.key for p in ps} == {"nodes.a.split", "runtime.queue_depth", "runtime.microbatch_size"}


def test_override_location_is_reported(write_recipe):
    ps = problems(write_recipe, "nodes: {a: {kind: synthetic.chain, in: {x: inputs.x}}}\n", overrides=["nodes.a.split=9"])
    assert str(ps[0].where) == "override 'nodes.a.split=9'"


def test_target_needs_allow_list(write_recipe):
    p = one(write_recipe, "nodes: {a: {_target_: os.system, in: {x: inputs.x}}}\n")
    assert "allow_targets" in p.message


def test_allowed_target_is_loaded(write_recipe):
    from mmpipe.dsl.compile import compile_recipe as cr

    p = write_recipe(HEAD + "allow_targets: [mmpipe.graphs.synthetic]\nnodes: {a: {_target_: mmpipe.graphs.synthetic.Chain, in: {x: inputs.x}}}\n")
    plan = cr(str(p))
    assert plan.nodes["a"].kind == "synthetic.chain"


def test_yaml_syntax_error_has_line(write_recipe):
    p = one(write_recipe, "nodes: {a: {kind: synthetic.chain, in: {x: inputs.x}, work: ???}}\n")
    assert "YAML syntax error" in p.message and p.where.line == 8
