"""Plans: JSON round-trip, text/Mermaid views, snapshots of every shipped recipe."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmpipe.dsl.compile import compile_recipe
from mmpipe.dsl.load import shipped_recipes
from mmpipe.dsl.plan import Plan

SNAP = Path(__file__).resolve().parents[2] / "snapshots"


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_plan_json_round_trip(name):
    plan = compile_recipe(name)
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.to_text() == plan.to_text()


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_plan_snapshot(name):
    """The text and Mermaid of each shipped recipe's plan (MMPIPE_UPDATE_SNAPSHOTS=1 rewrites)."""
    plan = compile_recipe(name)
    text = (plan.to_text() + "\n\n" + plan.to_mermaid() + "\n").replace(str(Path(plan.file).parent), "<recipes>")
    path = SNAP / f"plan_{name}.txt"
    if os.environ.get("MMPIPE_UPDATE_SNAPSHOTS"):
        path.write_text(text)
    assert path.exists(), f"no snapshot {path.name}: run with MMPIPE_UPDATE_SNAPSHOTS=1 and review it"
    assert text == path.read_text()


def test_mermaid_marks_loops():
    m = compile_recipe("whisper_stt", ["nodes.decoder.split=2"]).to_mermaid()
    assert m.startswith("flowchart LR") and "next iteration" in m and "stage 2 @ cpu" in m
