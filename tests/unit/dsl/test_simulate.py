"""The discrete-event simulation on cases whose schedule can be worked out by hand."""
from __future__ import annotations

from pathlib import Path

import pytest

from mmpipe.dsl.compile import compile_recipe
from mmpipe.dsl.costs import NodeCost, PartCost, Profile, ProfileKey, config_digest, expected_key, set_corun
from mmpipe.dsl.plan import Plan
from mmpipe.dsl.schedule import theory_bubble
from mmpipe.dsl.sim_share import linux_time_slice
from mmpipe.dsl.simulate import simulate, simulate_plan


def profiled(tmp: Path, recipe: str, args: list[str], parts: dict[str, list[float]], cores: int = 64, cpu: float = 0.0,
             out_bytes: int = 0, trips: list[int] | None = None, corun: float = 1.0) -> tuple[Plan, Profile]:
    """Compile ``recipe`` with a profile giving each node's parts these seconds (and co-run factor)."""
    plan = compile_recipe(recipe, args)
    nodes = {}
    for name, pn in plan.nodes.items():
        times = parts.get(name, [0.0] * pn.num_parts)
        nc = NodeCost(kind=pn.kind, num_parts=pn.num_parts, loop=pn.loop, light=pn.light, digest=config_digest(pn),
                      parts=[PartCost(time_s=t, cpu_s=cpu * t, out_bytes=out_bytes, corun=corun) for t in times])
        if pn.loop:
            nc.trip_counts = trips or [1]
            nc.trips_per_item = sum(nc.trip_counts) / len(nc.trip_counts)
            nc.iterations_per_mb = max(nc.trip_counts)
        nodes[name] = nc
    prof = Profile(key=expected_key(plan.recipe, plan.nodes, plan.stages[0].device, plan.runtime), nodes=nodes, host={"cores": cores})
    path = prof.save(tmp / "profile.json")
    return compile_recipe(recipe, args + [f"profile={path}"]), prof


@pytest.mark.parametrize("p,m", [(2, 1), (2, 8), (4, 4), (8, 3)])
def test_equal_stages_stream_like_gpipe(tmp_path: Path, p: int, m: int) -> None:
    plan, prof = profiled(tmp_path, "synthetic", [f"stages={p}", "runtime.microbatch_size=1"], {"chain": [0.01] * p})
    res = simulate(plan, prof, m)
    assert res.wall_s == pytest.approx(0.01 * (m + p - 1))
    assert res.bubble == pytest.approx(theory_bubble(p, m))
    assert res.throughput_rps == pytest.approx(m / res.wall_s)
    assert [w["calls"] for w in res.workers] == [m] * p


def test_slowest_stage_sets_the_pace(tmp_path: Path) -> None:
    plan, prof = profiled(tmp_path, "synthetic", ["stages=3", "runtime.microbatch_size=1", "runtime.queue_depth=1"], {"chain": [1.0, 3.0, 1.0]})
    res = simulate(plan, prof, 5)
    assert res.wall_s == pytest.approx(1 + 3 * 5 + 1)
    assert res.workers[1]["busy_pct"] == pytest.approx(100 * 15 / 17)
    assert res.latency_p50_s == pytest.approx(1 + 3 * 3 + 1)  # the third of five finishes in the middle


def test_copies_take_turns(tmp_path: Path) -> None:
    args = ["stages=3", "runtime.microbatch_size=1", "+nodes.chain.costs=[1,1,1]"]
    plan, prof = profiled(tmp_path, "synthetic", args, {"chain": [1.0, 4.0, 1.0]})
    # the middle part as a node of its own cannot be copied alone: copy the whole chain cut in 3 instead
    plan.stages[1].replicas = [plan.stages[1].places[0], type(plan.stages[1].places[0])(0, "cpu")]
    plan.stages[1].owner = "middle"
    res = simulate(plan, prof, 6)
    calls = {(w["stage"], w["replica"]): w["calls"] for w in res.workers}
    assert calls[(1, 0)] == 3 and calls[(1, 1)] == 3
    assert res.wall_s == pytest.approx(15.0)  # worked out by hand: copies alternate, each 4 s per micro-batch


def test_shared_cores_slow_everyone_down(tmp_path: Path) -> None:
    plan, prof = profiled(tmp_path, "synthetic", ["stages=2", "runtime.microbatch_size=1"], {"chain": [1.0, 1.0]}, cores=1, cpu=1.0)
    assert simulate(plan, prof, 4).wall_s == pytest.approx(8.0)  # 8 s of CPU on one core
    plan, prof = profiled(tmp_path, "synthetic", ["stages=2", "runtime.microbatch_size=1"], {"chain": [1.0, 1.0]}, cores=2, cpu=1.0)
    assert simulate(plan, prof, 4).wall_s == pytest.approx(5.0)  # two cores: a plain pipeline


def test_more_busy_stages_than_cores_take_turns_in_time_slices(tmp_path: Path) -> None:
    # one core, two stages of 1 s of CPU, two micro-batches: at t = 1 stage 0 (mb 1) and stage 1 (mb 0) both want it
    args = ["stages=2", "runtime.microbatch_size=1"]
    plan, prof = profiled(tmp_path, "synthetic", args + ["balance.time_slice_ms=10000"], {"chain": [1.0, 1.0]}, cores=1, cpu=1.0)
    res = simulate(plan, prof, 2)
    # slices longer than a call: stage 0 keeps the core for mb 1, stage 1 waits; a call's span starts on the
    # core (as the runtime's trace spans do), so the waiting is bubble: busy 2 s each in a 4-s window
    assert res.wall_s == pytest.approx(4.0) and res.bubble == pytest.approx(0.5)
    plan, prof = profiled(tmp_path, "synthetic", args + ["balance.time_slice_ms=50"], {"chain": [1.0, 1.0]}, cores=1, cpu=1.0)
    res = simulate(plan, prof, 2)
    # short slices: both calls crawl side by side from t = 1 (stage 1's first turn at 1.05) to about t = 3
    assert res.wall_s == pytest.approx(4.0) and res.bubble == pytest.approx(1 - (3 + 2.95) / 8, abs=0.02)
    # enough cores: nobody waits, whatever the slice
    plan, prof = profiled(tmp_path, "synthetic", args + ["balance.time_slice_ms=10000"], {"chain": [1.0, 1.0]}, cores=2, cpu=1.0)
    assert simulate(plan, prof, 2).bubble == pytest.approx(theory_bubble(2, 2))


def test_co_running_parts_slow_each_other_while_other_cores_are_busy(tmp_path: Path) -> None:
    args = ["stages=2", "runtime.microbatch_size=1"]
    # 2 cores, parts 1.5x slower beside a busy core: the first and last calls run alone (1 s),
    # the three in between two at a time (1.5 s each)
    plan, prof = profiled(tmp_path, "synthetic", args, {"chain": [1.0, 1.0]}, cores=2, cpu=1.0, corun=1.5)
    assert simulate(plan, prof, 4).wall_s == pytest.approx(1 + 3 * 1.5 + 1)
    # 4 cores: the one other busy core is a third of the others
    plan, prof = profiled(tmp_path, "synthetic", args, {"chain": [1.0, 1.0]}, cores=4, cpu=1.0, corun=1.5)
    assert simulate(plan, prof, 4).wall_s == pytest.approx(1 + 3 * (1 + 0.5 / 3) + 1)
    # sleeping stages (no core kept busy) do not slow each other
    plan, prof = profiled(tmp_path, "synthetic", args, {"chain": [1.0, 1.0]}, cores=2, cpu=0.0, corun=1.5)
    assert simulate(plan, prof, 4).wall_s == pytest.approx(5.0)


def test_set_corun_is_the_ratio_of_times_with_a_core_each() -> None:
    def prof(times: list[float], share: float) -> Profile:
        nc = NodeCost(kind="synthetic.chain", num_parts=len(times), parts=[PartCost(time_s=t) for t in times])
        return Profile(key=ProfileKey("r", {}, "cpu", "float32", 1, 1), nodes={"chain": nc}, host={"cpu_share": share})

    alone, beside = prof([1.0, 2.0, 0.5], 1.0), prof([1.2, 1.9, 0.75], 1.0)
    set_corun(alone, beside)
    assert [p.corun for p in alone.nodes["chain"].parts] == pytest.approx([1.2, 1.0, 1.5])  # never below 1.0
    alone, beside = prof([1.0], 1.0), prof([2.4], 0.5)  # beside, the thread got half a core: 1.2 s of it was the part
    set_corun(alone, beside)
    assert alone.nodes["chain"].parts[0].corun == pytest.approx(1.2)


def test_linux_time_slice() -> None:
    assert [linux_time_slice(c) for c in (1, 2, 4, 16)] == pytest.approx([0.00075, 0.0015, 0.00225, 0.003])


LOOP = """
defaults: [{placement: cpu}, {runtime: threads}, _self_]
name: loopy
inputs: {x: {type: tensor}, trips: {type: tensor}}
outputs: {y: body.y}
source: {kind: synthetic.requests, count: 4, width: 4, max_trips: 5}
nodes:
  body: {kind: synthetic.loop, in: {x: inputs.x, trips: inputs.trips}, parts: 1, work: noop}
batching: {max_batch_size: 8, max_delay_ms: 1}
runtime: {microbatch_size: 2, max_inflight: 1}
"""


def test_loops_admit_and_top_up_groups(write_recipe, tmp_path: Path) -> None:
    path = write_recipe(LOOP)
    plan, prof = profiled(tmp_path, str(path), [], {"body": [1.0]}, trips=[1, 5])
    res = simulate(plan, prof, 4)
    # group [a(1), b(5)]; after one iteration a leaves and the waiting micro-batch [c(1), d(5)] joins:
    # b and d finish after 5 and 6 iterations, not 5 + 5
    assert res.workers[0]["calls"] == 6 and res.wall_s == pytest.approx(6.0)
    plan, prof = profiled(tmp_path, str(path), ["runtime.max_inflight=2"], {"body": [1.0]}, trips=[3, 3])
    assert simulate(plan, prof, 4).workers[0]["calls"] == 6  # two groups of 3 iterations take turns


PRELUDE = """
name: prelude_sim
inputs: {x: {type: tensor}, trips: {type: tensor}}
outputs: {y: body.y}
source: {kind: synthetic.requests, count: 4, width: 4, max_trips: 5}
nodes:
  pre: {kind: synthetic.chain, in: {x: inputs.x}, parts: 1, work: noop}
  body: {kind: synthetic.loop, in: {x: pre.y, trips: inputs.trips}, parts: 1, work: noop, with_previous: true}
batching: {max_batch_size: 8, max_delay_ms: 1}
runtime: {microbatch_size: 2, max_inflight: 1}
"""


def test_a_prelude_runs_once_per_item_as_it_enters_the_loop(write_recipe, tmp_path: Path) -> None:
    path = write_recipe(PRELUDE)
    # pre: 2 s per micro-batch of 2 (1 s per item), one loop iteration 1 s; items a(1) b(3) | c(1) d(3)
    plan, prof = profiled(tmp_path, str(path), [], {"pre": [2.0], "body": [1.0]}, trips=[1, 3])
    assert [[u.node for u in s.units] for s in plan.stages] == [["pre", "body"]]
    res = simulate(plan, prof, 4)
    # [a, b] enter (2 s of prelude + 1 s); b comes back and c, d join it (2 s + 1 s); then [b, d] and [d]
    assert res.workers[0]["calls"] == 4 and res.wall_s == pytest.approx(8.0)
    plan, prof = profiled(tmp_path, str(path), ["nodes.body.with_previous=false"], {"pre": [2.0], "body": [1.0]}, trips=[1, 3])
    res = simulate(plan, prof, 4)
    # apart, pre is a stage of its own: [a, b] reach the loop at 2 s, [c, d] at 4 s (b went around alone once)
    assert len(plan.stages) == 2 and res.workers[1]["calls"] == 5 and res.wall_s == pytest.approx(7.0)


def test_an_iteration_costs_more_for_a_bigger_group(write_recipe, tmp_path: Path) -> None:
    path = write_recipe(LOOP)
    plan, prof = profiled(tmp_path, str(path), [], {"body": [1.0]}, trips=[1])
    assert simulate(plan, prof, 4).wall_s == pytest.approx(2.0)  # two groups of 2, one iteration each
    # profiled at 1 item per iteration on average, 0.5 s more per item: a group of 2 takes 1.5 s
    prof.nodes["body"].group_items, prof.nodes["body"].parts[0].item_s = 1.0, 0.5
    assert simulate(plan, prof, 4).wall_s == pytest.approx(3.0)


def test_transfers_between_hosts(tmp_path: Path) -> None:
    args = ["stages=2", "runtime=distributed", "runtime.nproc=2", "runtime.microbatch_size=1", "balance.hosts=2",
            "balance.bandwidth_gbs=0.001", "balance.latency_ms=10"]
    plan, prof = profiled(tmp_path, "synthetic", args, {"chain": [0.1, 0.1]}, out_bytes=100_000)
    assert {st.places[0].rank for st in plan.stages} == {0, 1}
    # one hop rank 0 -> rank 1 between hosts: 100 kB at 1 MB/s + 10 ms
    assert simulate(plan, prof, 1).wall_s == pytest.approx(0.1 + 0.1 + 0.01 + 0.1)
    plan, prof = profiled(tmp_path, "synthetic", args[:-3], {"chain": [0.1, 0.1]}, out_bytes=100_000)
    assert simulate(plan, prof, 1).wall_s == pytest.approx(0.2 + 100_000 / 4e9 + 0.0002)  # one host: fast link


def test_simulate_plan_reads_the_plans_profile(tmp_path: Path) -> None:
    plan, _ = profiled(tmp_path, "synthetic", ["stages=2", "requests=12"], {"chain": [0.01, 0.01]})
    res = simulate_plan(plan)
    assert res.requests == 12 and res.microbatches == 3
    assert simulate_plan(plan, microbatches=5).requests == 20


def test_other_processes_load_the_cores(tmp_path: Path) -> None:
    # profiled while 3 busy threads of other processes shared 2 cores: a thread got half a core
    plan, prof = profiled(tmp_path, "synthetic", ["stages=2", "runtime.microbatch_size=1", "runtime.queue_depth=1"], {"chain": [1.0, 1.0]},
                          cores=2, cpu=0.5)
    prof.host.update(cpu_share=0.5, background=3.0)
    assert simulate(plan, prof, 1).wall_s == pytest.approx(2.0)  # one op at a time: as profiled
    # two ops at once with the same background: 2 cores for 2 + 3 threads
    assert simulate(plan, prof, 6).wall_s == pytest.approx(1.0 + 5 * 0.5 / 0.4 + 1.0)
    plan.predicted["balance"]["background"] = 0.0  # the same machine alone: the unloaded work
    assert simulate(plan, prof, 6).wall_s == pytest.approx(0.5 * 7)


def test_the_runtimes_own_cost_is_one_interpreter_per_process(tmp_path: Path) -> None:
    plan, prof = profiled(tmp_path, "synthetic", ["stages=4", "runtime.microbatch_size=1"], {"chain": [0.0] * 4})
    prof.host["hop_s"] = 0.001
    assert simulate(plan, prof, 10).wall_s == pytest.approx(10 * 4 * 0.001)  # every call holds the GIL in turn
    plan, prof = profiled(tmp_path, "synthetic", ["stages=2", "runtime=distributed", "runtime.nproc=2", "runtime.microbatch_size=1",
                                                  "balance.latency_ms=0"], {"chain": [0.0] * 2})
    prof.host["hop_s"] = 0.001
    assert simulate(plan, prof, 10).wall_s == pytest.approx(11 * 0.001)  # two processes: two interpreters at once
