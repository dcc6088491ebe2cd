"""split/replicas/placement: auto in the compiler, profiles and their keys, predictions, DOT."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mmpipe.dsl.compile import compile_recipe
from mmpipe.dsl.costs import NodeCost, PartCost, Profile, ProfileKey, config_digest, expected_key, load_profile
from mmpipe.dsl.errors import RecipeError
from mmpipe.dsl.schedule import theory_bubble


def chain_profile(tmp: Path, times: list[float], overrides: list[str] | None = None, cpu: float = 0.0, **key: object) -> Path:
    """A profile of the synthetic recipe's chain with these per-part seconds (as measured)."""
    plan = compile_recipe("synthetic", [f"stages={len(times)}", *(overrides or [])])
    pn = plan.nodes["chain"]
    parts = [PartCost(time_s=t, cpu_s=cpu * t, param_bytes=1000, act_bytes=10, out_bytes=4096) for t in times]
    k = expected_key(plan.recipe, plan.nodes, "cpu", plan.runtime)
    for f, v in key.items():
        setattr(k, f, v)
    prof = Profile(key=k, nodes={"chain": NodeCost(kind=pn.kind, num_parts=len(times), parts=parts, digest=config_digest(pn))},
                   microbatches=3, host={"cores": 2, "memory_bytes": 2**34})
    return prof.save(tmp / "profile.json")


def test_profile_round_trip_and_bad_files(tmp_path: Path) -> None:
    p = chain_profile(tmp_path, [0.01, 0.02])
    prof = load_profile(p)
    assert [pc.time_s for pc in prof.nodes["chain"].parts] == [0.01, 0.02] and prof.key.recipe == "synthetic"
    assert load_profile(tmp_path).key == prof.key  # a directory means its profile.json
    with pytest.raises(ValueError, match="no profile"):
        load_profile(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not an mmpipe profile"):
        load_profile(tmp_path / "x.json")


def test_profile_that_does_not_match_is_a_problem_for_each_difference(tmp_path: Path) -> None:
    p = chain_profile(tmp_path, [0.01, 0.02], dtype="float16", threads=7)
    with pytest.raises(RecipeError) as e:
        compile_recipe("synthetic", ["stages=2", f"profile={p}", "runtime.microbatch_size=2", "stage_ms=3"])
    text = e.value.format()
    assert text.startswith("4 problems found")
    for what in ("dtype is float16 there, float32 here", "microbatch_size is 4 there, 2 here", "threads is 7 there",
                 "node chain is other parameters"):
        assert what in text, text
    assert all(p.where.override == f"profile={p}" for p in e.value.problems) or all(p.key == "profile" for p in e.value.problems)
    assert text.count("fix:") == 4


def test_missing_profile_and_misused_auto_options(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as e:
        compile_recipe("whisper_stt", [f"profile={tmp_path}/none.json", "nodes.text.split=auto", "balance.devices=[cpu]"])
    text = e.value.format()
    assert "no profile at" in text and "whisper.detokenize cannot be split" in text and "only read by placement: auto" in text
    with pytest.raises(RecipeError, match="places every node itself"):
        compile_recipe("synthetic", ["placement=auto", "+placement.chain=cpu"])


def test_split_auto_on_hints_says_so() -> None:
    plan = compile_recipe("synthetic", ["stages=4", "nodes.chain.split=auto", "balance.stages=2", "+nodes.chain.costs=[1,1,1,3]"])
    assert plan.nodes["chain"].pieces == [[0, 3], [3, 4]]
    assert plan.predicted is not None and not plan.predicted["measured"] and plan.predicted["throughput_rps"] is None
    assert any("cost hints" in n for n in plan.predicted["notes"])


def test_split_auto_on_a_profile(tmp_path: Path) -> None:
    p = chain_profile(tmp_path, [0.01, 0.01, 0.01, 0.01, 0.04, 0.04])
    plan = compile_recipe("synthetic", ["stages=6", f"profile={p}", "nodes.chain.split=auto", "balance.stages=3"])
    assert plan.nodes["chain"].pieces == [[0, 4], [4, 5], [5, 6]]
    pred = plan.predicted
    assert [round(r["time_s"], 6) for r in pred["stages"]] == [0.04, 0.04, 0.04]
    assert pred["balance_efficiency"] == pytest.approx(1.0) and pred["period_s"] == pytest.approx(0.04)
    assert pred["throughput_rps"] == pytest.approx(4 / 0.04)  # 4 requests per micro-batch
    # 32 requests -> 8 micro-batches; equal stages: GPipe's (p-1)/(m+p-1)
    assert pred["microbatches"] == 8 and pred["bubble"] == pytest.approx(theory_bubble(3, 8))


def test_replicas_auto_and_shared_cores(tmp_path: Path) -> None:
    # every part keeps a core busy (cpu = time): 2 cores cap the gain of copies
    p = chain_profile(tmp_path, [0.03, 0.01], cpu=1.0)
    plan = compile_recipe("synthetic", ["stages=2", f"profile={p}", "nodes.chain.split=auto", "nodes.chain.replicas=auto", "balance.stages=8"])
    pred = plan.predicted
    assert pred["floor_s"] == pytest.approx(0.02) and pred["period_s"] == pytest.approx(0.02)
    assert pred["choice"]["copies"] <= 3  # no copy beyond what the cores can feed


def test_placement_auto_over_ranks(tmp_path: Path) -> None:
    p = chain_profile(tmp_path, [0.04, 0.01, 0.01, 0.01], overrides=["runtime=distributed", "runtime.nproc=2"])
    plan = compile_recipe("synthetic", ["stages=4", f"profile={p}", "placement=auto", "runtime=distributed", "runtime.nproc=2"])
    ranks = {pl.rank for st in plan.stages for pl in st.places}
    assert ranks == {0, 1}
    for st in plan.stages:  # copies of one stage spread over the ranks
        assert len({pl.rank for pl in st.places}) == min(len(st.places), 2)
    assert plan.predicted["choice"]["copies"] >= 2


def test_placement_auto_counts_the_light_stage_on_rank_0(tmp_path: Path) -> None:
    # load + mel run on rank 0; with the encoder's copies on both ranks, the decode loop
    # goes to rank 1, which has nothing else (as the best hand-written placement does)
    from tests.unit.dsl.test_simulate import profiled

    args = ["runtime=distributed", "runtime.nproc=2", "placement=auto", "nodes.decoder.with_previous=false"]
    plan, _ = profiled(tmp_path, "whisper_stt", args, {"load": [0.02], "mel": [0.03], "encoder": [0.1] * 12, "decoder": [0.002] * 12},
                       cores=2, cpu=1.0, trips=[20])
    where = {plan.stage_label(st): [pl.rank for pl in st.places] for st in plan.stages}
    assert where == {"load + mel": [0], "encoder (parts 0-11/12)": [0, 1], "decoder (parts 0-11/12)": [1], "align + text": [1]}


def test_placement_auto_over_devices_needs_them_unless_simulated(tmp_path: Path) -> None:
    from mmpipe.dsl.compile import compile_loaded
    from mmpipe.dsl.load import load_recipe

    args = ["stages=4", "placement=auto", "balance.devices=[cuda:0,cuda:1,cuda:2,cuda:3]", "nodes.chain.split=auto"]
    with pytest.raises(RecipeError, match=r"balance.devices\[1\]: device 'cuda:1' is not available"):
        compile_recipe("synthetic", args, available=lambda d: d in ("cpu", "cuda:0"))
    plan = compile_loaded(load_recipe("synthetic", args), mode="simulate")
    assert sorted(pl.device for st in plan.stages for pl in st.places) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]  # a copy per GPU
    assert plan.nodes["chain"].replicas == 4  # copies hand nothing between GPUs: cheaper than cuts
    plan = compile_loaded(load_recipe("synthetic", args + ["balance.latency_ms=0"]), mode="simulate")
    # free transfers: cuts and copies tie on period and copies; copies make the shorter pipeline
    assert plan.nodes["chain"].replicas == 4 and plan.nodes["chain"].split == 1


def test_profile_mode_has_one_piece_per_part() -> None:
    from mmpipe.dsl.compile import compile_loaded
    from mmpipe.dsl.load import load_recipe

    plan = compile_loaded(load_recipe("whisper_stt", ["nodes.encoder.split=2", "runtime=distributed", "runtime.nproc=2",
                                                      "+placement.encoder.1=rank1"]), mode="profile")
    assert plan.nodes["encoder"].split == 12 and plan.nodes["decoder"].pieces == [[k, k + 1] for k in range(12)]
    assert all(st.places[0].rank == 0 for st in plan.stages) and not plan.transfers  # measured in one process


def test_dot_shows_places_copies_and_transfers() -> None:
    plan = compile_recipe("whisper_stt", ["runtime=distributed", "runtime.nproc=2", "placement.encoder=[rank0,rank1]"])
    dot = plan.to_dot()
    assert dot.startswith("digraph plan {") and dot.rstrip().endswith("}") and dot.count("{") == dot.count("}")
    defined = set(re.findall(r"^\s+(s\d+_\d+|inputs|outputs) \[", dot, re.M)) | {"inputs", "outputs"}
    used = re.findall(r"^\s+(\w+) -> (\w+)", dot, re.M)
    assert used and all(a in defined and b in defined for a, b in used)
    assert 'label="rank 0 : cpu"' in dot and 'label="rank 1 : cpu"' in dot
    assert "copy 1/2" in dot and "(transfer)" in dot and "color=red" in dot
    assert "next iteration" in dot


def test_plan_without_profile_or_auto_predicts_nothing() -> None:
    assert compile_recipe("synthetic", []).predicted is None
    key = ProfileKey("synthetic", {}, "cpu", "float32", 4, 2)
    assert key == ProfileKey(**json.loads(json.dumps(key.__dict__)))


def test_a_profile_of_mixed_devices_matches_the_same_placement(tmp_path: Path) -> None:
    p = chain_profile(tmp_path, [0.01, 0.02], device="cpu+cuda")
    cpu_only = lambda d: True  # noqa: E731  (this machine may have no GPU)
    plan = compile_recipe("synthetic", ["stages=2", f"profile={p}", "+placement.chain.1=cuda:0"], available=cpu_only)
    assert plan.predicted["measured"] and [st.device for st in plan.stages] == ["cpu", "cuda:0"]
    with pytest.raises(RecipeError, match="device is cpu\\+cuda there, cpu here"):
        compile_recipe("synthetic", ["stages=2", f"profile={p}"])


def test_the_automatic_budget_grows_to_one_stage_per_heavy_node_and_says_so_once() -> None:
    """2 x 1 core / 4 threads gives an automatic budget of 1 stage copy; whisper_stt has two
    heavy nodes, so the budget becomes 2, and the one balancer note says both."""
    over = ["nodes.encoder.split=auto", "nodes.decoder.split=auto", "balance.cores=1", "runtime.threads_per_stage=4"]
    plan = compile_recipe("whisper_stt", over)
    notes = [n for n in plan.predicted["notes"] if n.startswith("balancer:")]
    assert len(notes) == 1 and "at most 2 stage copies (one per heavy node" in notes[0]
    plain = [n for n in compile_recipe("whisper_stt", over[:2] + ["balance.stages=2"]).predicted["notes"] if n.startswith("balancer:")]
    assert len(plain) == 1 and "one per heavy node" not in plain[0] and "at most 2 stage copies" in plain[0]
