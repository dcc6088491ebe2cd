"""Hydra composition through mmpipe: overrides, groups, provenance, sweeps."""
from __future__ import annotations

import pytest

from mmpipe.dsl.errors import RecipeError
from mmpipe.dsl.load import load_recipe, resolve_recipe, shipped_recipes, yaml_lines
from mmpipe.dsl.overrides import expand_sweep


def test_shipped_recipes_are_found():
    names = set(shipped_recipes())
    assert {"synthetic", "whisper_stt", "sd_txt2img"} <= names
    assert resolve_recipe("synthetic").name == "synthetic.yaml"


def test_unknown_recipe_suggests_name():
    with pytest.raises(RecipeError) as e:
        resolve_recipe("whisper_sst")
    assert "did you mean 'whisper_stt'" in e.value.format()


def test_yaml_lines_map_key_paths():
    lines = yaml_lines("a:\n  b: 1\n  c:\n    - 5\n    - 6\nd: x\n")
    assert lines == {"a": 1, "a.b": 2, "a.c": 3, "a.c[0]": 4, "a.c[1]": 5, "d": 6}


def test_override_kinds_work():
    loaded = load_recipe("synthetic", ["stages=2", "+extra=1", "~seed", "runtime=sequential"])
    cfg = loaded.cfg
    assert cfg.stages == 2 and cfg.nodes.chain.split == 2
    assert cfg.extra == 1 and "seed" not in cfg
    assert cfg.runtime.backend == "sequential" and loaded.choices["runtime"] == "sequential"


def test_provenance_points_at_files_and_overrides():
    loaded = load_recipe("synthetic", ["stage_ms=3"])
    prov = loaded.provenance
    w = prov.where("nodes.chain.split")
    assert w.file.endswith("synthetic.yaml") and w.line is not None
    assert str(prov.where("stage_ms")) == "override 'stage_ms=3'"
    assert prov.where("runtime.queue_depth").file.endswith("runtime/threads.yaml")


def test_user_recipe_can_use_shipped_groups(write_recipe):
    p = write_recipe(
        """
        defaults:
          - runtime: sequential
          - _self_
        name: mine
        inputs: {x: {type: tensor}}
        outputs: {y: c.y}
        source: {kind: synthetic.requests, count: 2}
        nodes:
          c: {kind: synthetic.chain, in: {x: inputs.x}, work: noop}
        """
    )
    loaded = load_recipe(str(p), [])
    assert loaded.cfg.runtime.backend == "sequential"


def test_bad_override_is_one_problem_naming_it():
    with pytest.raises(RecipeError) as e:
        load_recipe("synthetic", ["stagse=3"])
    text = e.value.format()
    assert "override 'stagse=3'" in text and "did you mean 'stages'" in text


def test_unknown_group_option():
    with pytest.raises(RecipeError) as e:
        load_recipe("synthetic", ["runtime=thread"])
    assert "runtime/thread" in e.value.format()


def test_expand_sweep_is_cartesian():
    jobs = expand_sweep(["stages=1,2", "work=noop", "stage_ms=1,2,3"])
    assert len(jobs) == 6
    assert jobs[0] == ["stages=1", "work=noop", "stage_ms=1"]
    assert jobs[-1] == ["stages=2", "work=noop", "stage_ms=3"]
