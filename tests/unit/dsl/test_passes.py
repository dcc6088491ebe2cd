"""Each compiler pass on its own."""
from __future__ import annotations

import pytest

from mmpipe.dsl.compile import (balanced_ranges, choose_schedule, compile_recipe, device_of, insert_transfers,
                                partition_stages, wire_stages)
from mmpipe.dsl.plan import Edge, PlanNode, PortSpec, Stage, Unit
from mmpipe.dsl.shapes import evaluate, substitute, unify


def test_balanced_ranges_minimise_the_largest_group():
    assert balanced_ranges([1, 1, 1, 1], 2) == [[0, 2], [2, 4]]
    assert balanced_ranges([4, 1, 1, 1, 1], 2) == [[0, 1], [1, 5]]
    assert balanced_ranges([1, 2, 3], 3) == [[0, 1], [1, 2], [2, 3]]
    with pytest.raises(ValueError):
        balanced_ranges([1], 2)


def test_shape_unification():
    b: dict = {}
    assert unify(["B", "T", 80], ["B", 3000, 80], b) is None and b["T"] == 3000
    assert "dim 2" in unify(["B", "T", 80], ["B", 3000, 128], {})
    assert "rank" in unify(["B", "T"], ["B"], {})
    b = {"H": 64}
    assert evaluate("H/8", b) == 8 and substitute(["B", "H/8"], b) == ["B", 8]


def node(name: str, split: int = 1, light: bool = False, loop: bool = False, parts: int | None = None) -> PlanNode:
    n = parts or split
    from mmpipe.dsl.compile import balanced_ranges as br

    return PlanNode(name, "k", None, {}, {}, [], [PortSpec("y", "float32", None)], n, split, br([1.0] * n, split), [1.0] * n, loop=loop, light=light)


def test_partition_fuses_light_nodes_and_isolates_loops():
    nodes = {"load": node("load", light=True), "enc": node("enc", split=2), "dec": node("dec", split=2, loop=True), "txt": node("txt", light=True)}
    stages = partition_stages(nodes, list(nodes), {})
    assert [[(u.node, u.piece) for u in s.units] for s in stages] == [
        [("load", 0), ("enc", 0)], [("enc", 1)], [("dec", 0)], [("dec", 1)], [("txt", 0)]]
    assert [s.loop for s in stages] == [None, None, "dec", "dec", None]


def test_partition_splits_at_device_changes():
    nodes = {"a": node("a", light=True), "b": node("b"), "c": node("c", light=True)}
    stages = partition_stages(nodes, list(nodes), {"a": "cpu", "b": "cuda:0", "c": "cuda:0"})
    assert [[u.node for u in s.units] for s in stages] == [["a"], ["b", "c"]]
    assert [s.device for s in stages] == ["cpu", "cuda:0"]


def test_device_lookup_order():
    pl = {"default": "cuda:0", "dec": "cuda:1", "dec.1": "cpu"}
    assert device_of("dec", 1, pl) == "cpu" and device_of("dec", 0, pl) == "cuda:1" and device_of("x", 0, pl) == "cuda:0"
    assert device_of("x", 0, {}) == "cpu"


def test_transfers_only_between_devices():
    stages = [Stage(0, "cpu", [Unit("a", 0, [0, 1])], 1), Stage(1, "cuda:0", [Unit("b", 0, [0, 1])], 1), Stage(2, "cuda:0", [Unit("c", 0, [0, 1])], 1)]
    edges = [Edge("a.y", 0, 1, "float32", None), Edge("b.y", 1, 2, "float32", None), Edge("a.y", 0, 2, "float32", None)]
    ts = insert_transfers(stages, edges)
    assert [(t.key, t.src_stage, t.dst_stage) for t in ts] == [("a.y", 0, 1), ("a.y", 0, 2)]
    assert choose_schedule(stages) == "streaming"


def test_wire_stages_delivers_non_adjacent_values_and_loop_inputs():
    plan = compile_recipe("whisper_stt", ["nodes.encoder.split=2", "nodes.decoder.split=3"])
    # the encoder output is read by every decoder stage (cross-attention) and by the word
    # alignment after the loop: non-adjacent edges
    dec_stages = [s.index for s in plan.stages if s.loop == "decoder"]
    align = next(s.index for s in plan.stages if any(u.node == "align" for u in s.units))
    assert plan.consumers["encoder.hidden"] == dec_stages + [align]
    assert plan.consumers["encoder#0"] == [1]
    assert plan.consumers["text.text"] == [plan.num_stages]  # final output
    assert plan.schedule == "loop-reentry" and plan.loops[0].stages == dec_stages


def test_placement_override_changes_plan():
    plan = compile_recipe("whisper_stt", ["nodes.decoder.split=2", "+placement.decoder.1=meta"])
    devs = {plan.stage_label(s): s.device for s in plan.stages}
    assert [d for k, d in devs.items() if k.startswith("decoder.1")] == ["meta"]
    assert any(t.dst_device == "meta" for t in plan.transfers)


def test_wire_stages_unit():
    nodes = {"a": node("a", split=2), "b": node("b")}
    nodes["b"].wires = {"x": "a.y"}
    nodes["a"].wires = {"x": "inputs.x"}
    stages = partition_stages(nodes, ["a", "b"], {})
    from mmpipe.dsl.plan import PortSpec as P

    edges, consumers = wire_stages(stages, nodes, {"out": "b.y"}, {"a.y": P("y", "float32", ["B"])})
    assert consumers == {"a#0": [1], "a.y": [2], "b.y": [3], "inputs.x": [0]}
    assert [s.reads for s in stages] == [["inputs.x"], ["a#0"], ["a.y"]]


def test_distributed_placement_names_ranks_and_spreads_the_rest():
    plan = compile_recipe("whisper_stt", ["runtime=distributed", "runtime.nproc=3", "nodes.encoder.split=2", "nodes.decoder.split=2",
                                          "placement.decoder.1=rank2"])
    ranks = {plan.stage_label(s): s.rank for s in plan.stages}
    assert ranks["decoder.1 (parts 10-11/12)"] == 2
    assert sorted({s.rank for s in plan.stages}) == [0, 1, 2]  # every rank runs something
    # contiguous groups: ranks never go back
    spread = [s.rank for s in plan.stages if plan.stage_label(s) != "decoder.1 (parts 10-11/12)"]
    assert spread == sorted(spread)
    assert any("rank" in t.src_device for t in plan.transfers)


def test_replicas_from_a_placement_list_and_from_a_count():
    plan = compile_recipe("whisper_stt", ["runtime=distributed", "runtime.nproc=2", "placement.encoder=[rank0,rank1]"])
    enc = next(s for s in plan.stages if s.owner == "encoder")
    assert [(p.rank, p.device) for p in enc.places] == [(0, "cpu"), (1, "cpu")] and plan.nodes["encoder"].replicas == 2
    plan = compile_recipe("synthetic", ["stages=2", "nodes.chain.replicas=3"])
    assert [len(s.places) for s in plan.stages] == [3, 3] and "[cpu, cpu, cpu]" in plan.to_text()


@pytest.mark.parametrize("overrides, key, words", [
    (["runtime=distributed", "runtime.nproc=2", "placement.decoder=rank2"], "placement.decoder", "rank 2 does not exist"),
    (["placement.decoder=rank1"], "placement.decoder", "runs in one process"),
    (["runtime=distributed", "runtime.nproc=2", "nodes.encoder.replicas=3", "placement.encoder=[rank0,rank1]"], "placement.encoder", "2 places for 3 replica"),
    (["runtime=distributed", "runtime.nproc=2", "placement.default=rank0"], "placement", "rank(s) 1 would run no stage"),
    (["runtime=distributed", "runtime.nproc=9"], "runtime.nproc", "cannot be spread over 9 ranks"),
    (["runtime.nproc=2"], "runtime.nproc", "needs the distributed backend"),
    (["nodes.encoder.replicas=0"], "nodes.encoder.replicas", "positive integer"),
    (["placement.decoder=rank1:gpu"], "placement.decoder", "is not a place"),
])
def test_placement_mistakes_are_reported(overrides, key, words):
    from mmpipe.dsl.errors import RecipeError

    with pytest.raises(RecipeError) as e:
        compile_recipe("whisper_stt", overrides)
    assert any(p.key == key and words in p.message for p in e.value.problems), e.value.format()


def test_a_light_node_on_another_device_gets_its_own_stage_and_transfer():
    nodes = {"a": node("a"), "light": node("light", light=True), "b": node("b")}
    nodes["light"].wires, nodes["b"].wires = {"x": "a.y"}, {"x": "light.y"}
    stages = partition_stages(nodes, ["a", "light", "b"], {"a": "cpu", "light": "meta", "b": "cpu"})
    assert [[u.node for u in s.units] for s in stages] == [["a"], ["light"], ["b"]]
    from mmpipe.dsl.plan import PortSpec as P

    edges, _ = wire_stages(stages, nodes, {"out": "b.y"}, {"a.y": P("y", "float32", None), "light.y": P("y", "float32", None)})
    assert {(t.src_stage, t.dst_stage, t.dst_device) for t in insert_transfers(stages, edges)} == {(0, 1, "meta"), (1, 2, "cpu")}


def test_a_problem_on_an_unwritten_key_points_at_its_parent_line():
    from mmpipe.dsl.errors import Where
    from mmpipe.dsl.load import Provenance

    prov = Provenance(entries={"nodes.chain": Where("r.yaml", 7), "nodes.chain.in": Where("r.yaml", 8)}, recipe_file="r.yaml")
    assert str(prov.where("nodes.chain.parts")) == "r.yaml:7"  # not written: the node's line
    assert str(prov.where("nodes.chain.in.x")) == "r.yaml:8"
    assert str(prov.where("odd]key")) == "r.yaml"  # never fails on odd keys


# ---------------------------------------------------------------- with_previous
def labels(plan) -> list[str]:
    return [plan.stage_label(s) + (" [loop]" if s.loop else "") for s in plan.stages]


def test_a_loop_takes_in_the_stage_before_it():
    """The encoder's last piece runs in the decode loop's first stage; its output reaches the
    other loop stage and the stage after the loop through side stores, not the loop's stage."""
    plan = compile_recipe("whisper_stt", ["nodes.encoder.split=2", "nodes.decoder.split=2", "nodes.decoder.with_previous=true"])
    assert labels(plan) == ["load + mel + encoder.0 (parts 0-5/12)", "encoder.1 (parts 6-11/12) + decoder.0 (parts 0-9/12) [loop]",
                            "decoder.1 (parts 10-11/12) [loop]", "align + text"]
    first = plan.stages[1]
    assert first.loop == "decoder" and first.loop_unit.node == "decoder" and [u.node for u in first.prelude] == ["encoder"]
    assert plan.loops[0].stages == [1, 2] and first.owner == "decoder"
    assert plan.consumers["encoder.hidden"] == [1, 2, 3] and "encoder#0" in first.reads
    from mmpipe.runtime.routing import build_routes

    routes = build_routes(plan)
    assert routes.prelude == {1: ["encoder.hidden"]}
    hidden = routes.out[1]["encoder.hidden"]
    assert not hidden.to_next and hidden.store == [2, 3]  # made as items enter; the stage after the loop reads it later


def test_a_fan_out_before_the_joined_node_keeps_a_stage_of_its_own():
    plan = compile_recipe("whisper_stt", ["nodes.decoder.with_previous=true"])
    assert labels(plan) == ["load + mel", "encoder (parts 0-11/12) + decoder (parts 0-11/12) [loop]", "align + text"]


def test_a_plan_with_a_prelude_round_trips_through_json():
    from mmpipe.dsl.plan import Plan

    plan = compile_recipe("whisper_stt", ["nodes.encoder.split=2", "nodes.decoder.with_previous=true"])
    again = Plan.from_json(plan.to_json())
    assert again.nodes["decoder"].with_previous and [u.node for u in again.stages[1].prelude] == ["encoder"]
    assert "encoder.1" in plan.to_mermaid() and "decoder" in plan.to_dot()


@pytest.mark.parametrize("overrides, key, words", [
    (["nodes.encoder.with_previous=true"], "nodes.encoder.with_previous", "is not a loop node"),
    (["nodes.decoder.with_previous=maybe"], "nodes.decoder.with_previous", "must be true or false"),
    (["nodes.decoder.with_previous=true", "nodes.encoder.split=2", "nodes.encoder.replicas=2"], "nodes.decoder.with_previous", "cannot have copies"),
    (["nodes.decoder.with_previous=true", "nodes.encoder.split=2", "placement.decoder=meta"], "nodes.decoder.with_previous", "placed apart"),
])
def test_with_previous_mistakes_are_reported(overrides, key, words):
    from mmpipe.dsl.errors import RecipeError

    with pytest.raises(RecipeError) as e:
        compile_recipe("whisper_stt", overrides)
    assert any(p.key == key and words in p.message for p in e.value.problems), e.value.format()


def test_with_previous_needs_a_heavy_node_before_the_loop():
    nodes = {"load": node("load", light=True), "dec": node("dec", split=2, loop=True)}
    nodes["dec"].with_previous = True
    from mmpipe.dsl.load import Provenance
    from mmpipe.dsl.schema import Problems
    from mmpipe.dsl.stages import check_with_previous

    problems = Problems(Provenance(recipe_file="r.yaml"))
    check_with_previous(nodes, list(nodes), problems)
    assert [p.key for p in problems.items] == ["nodes.dec.with_previous"] and "no heavy node" in problems.items[0].message
