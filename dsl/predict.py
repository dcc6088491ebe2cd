"""Predicted numbers of a plan from its costs: per stage time and memory, balance, throughput, bubble.

A stage copy takes ``stage_time`` seconds per micro-batch (its pieces; loop pieces
for all iterations of a micro-batch; plus handing its output on when the next
stage is elsewhere). In steady state the pipeline's period is its slowest copy,
``time / copies``, or, for stages sharing a CPU host's cores, the CPU seconds of a
micro-batch divided by the cores if that is longer. A run of ``m`` micro-batches
then takes about ``latency + (m - 1) * period``; the predicted bubble is the idle
share of every worker over that time (as the runtime measures it).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmpipe.dsl.costs import Profile
from mmpipe.dsl.plan import Plan, Stage

if TYPE_CHECKING:
    from mmpipe.dsl.auto import Auto


def stage_time(costs: Profile, st: Stage) -> float:
    """Compute seconds per micro-batch of one copy of ``st`` (no transfers)."""
    return sum(costs.nodes[u.node].time(u.parts[0], u.parts[1]) for u in st.units)


def prelude_time(costs: Profile, st: Stage) -> float:
    """Seconds per micro-batch of a loop stage's prelude (``with_previous``; 0 without one)."""
    return sum(costs.nodes[u.node].time(u.parts[0], u.parts[1]) for u in st.prelude)


def stage_corun(costs: Profile, st: Stage) -> float:
    """How much slower ``st`` runs while every other core runs the same recipe (its parts'
    ``corun`` factors, weighted by their time; 1.0 when the profile did not measure it)."""
    alone = stage_time(costs, st)
    beside = sum(costs.nodes[u.node].corun_time(u.parts[0], u.parts[1]) for u in st.units)
    return beside / alone if alone > 0 else 1.0


def stage_cpu(costs: Profile, st: Stage) -> float:
    return sum(costs.nodes[u.node].cpu(u.parts[0], u.parts[1]) for u in st.units)


def stage_memory(costs: Profile, st: Stage) -> int:
    """Bytes one copy holds: its weights plus its largest activations."""
    return sum(costs.nodes[u.node].memory(u.parts[0], u.parts[1]) for u in st.units)


def out_bytes(costs: Profile, st: Stage) -> tuple[float, float]:
    """(bytes handed on per hand-over, hand-overs per micro-batch) of the stage's last piece."""
    u = st.units[-1]
    nc = costs.nodes[u.node]
    part = nc.parts[u.parts[1] - 1]
    inner = nc.loop and u.parts[1] < nc.num_parts
    return float(part.out_bytes), (nc.iterations_per_mb if inner else 1.0)


def transfer_time(auto: "Auto", plan: Plan, st: Stage) -> float:
    """Seconds per micro-batch to hand the stage's output to another place (0 on one device)."""
    if not auto.bandwidth or not any(t.src_stage == st.index for t in plan.transfers):
        return 0.0
    b, hops = out_bytes(auto.costs, st)
    return hops * (b / auto.bandwidth + auto.latency)


def predict(plan: Plan, auto: "Auto", microbatches: int | None = None) -> dict[str, Any]:
    """The plan's predicted numbers (see the module docstring); ``microbatches``: of a run."""
    costs = auto.costs
    rows = []
    for st in plan.stages:
        heavy = any(not costs.nodes[u.node].light for u in st.units)
        t = stage_time(costs, st) + transfer_time(auto, plan, st)
        copies = len(st.places)
        loop = costs.nodes[st.loop] if st.loop else None
        row: dict[str, Any] = {"stage": st.index, "copies": copies, "time_s": t, "per_copy_s": t / copies,
                               "cpu_s": stage_cpu(costs, st), "memory_bytes": stage_memory(costs, st), "heavy": heavy}
        if loop is not None and loop.iterations_per_mb:
            pre = prelude_time(costs, st)
            row["iterations"] = loop.iterations_per_mb
            row["per_iteration_s"] = (t - pre) / loop.iterations_per_mb
            if pre:
                row["prelude_s"] = pre
        rows.append(row)
    heavy_s: list[float] = [r["per_copy_s"] for r in rows if r["heavy"]] or [0.0]
    slowest = max(r["per_copy_s"] for r in rows) if rows else 0.0
    res = auto.resources
    share = float(costs.host.get("cpu_share", 1.0)) or 1.0  # as the balancer: the machine as if it were ours
    floor = sum(r["cpu_s"] for r in rows) / share / res.cores if res is not None and res.cores else 0.0
    period = max(slowest, floor)
    latency = sum(r["time_s"] for r in rows)
    size = int(plan.runtime.get("microbatch_size", 1))
    out: dict[str, Any] = {
        "source": auto.source, "profile": auto.profile_path or None, "measured": costs.measured, "stages": rows,
        "balance_efficiency": (sum(heavy_s) / len(heavy_s)) / max(heavy_s) if max(heavy_s) > 0 else 1.0,
        "slowest_s": slowest, "floor_s": floor, "period_s": period, "latency_s": latency,
        "throughput_rps": size / period if costs.measured and period > 0 else None, "notes": list(auto.notes),
        "balance": dict(auto.machine),
    }
    if auto.choice is not None:
        out["choice"] = {"pieces": auto.choice.pieces, "replicas": auto.choice.replicas, "copies": auto.choice.copies}
    if microbatches:
        out.update(bubble_for(rows, period, latency, microbatches))
    return out


def bubble_for(rows: list[dict[str, Any]], period: float, latency: float, m: int) -> dict[str, Any]:
    """Predicted wall time and bubble of a run of ``m`` micro-batches."""
    workers = sum(r["copies"] for r in rows)
    busy = m * sum(r["time_s"] for r in rows)
    window = latency + (m - 1) * period
    return {"microbatches": m, "run_s": window,
            "bubble": max(0.0, 1 - busy / (workers * window)) if workers and window > 0 else None}


def format_prediction(pred: dict[str, Any], plan: Plan) -> str:
    """Lines for ``mmpipe plan``: per stage, then efficiency, throughput and bubble."""
    unit = "s" if pred.get("measured") else ""

    def ms(v: float) -> str:
        return f"{1000 * v:.1f} ms" if unit else f"{v:.3f}"

    lines = [f"predicted ({pred['source']}):"]
    rows = [("stage", "copies", "per micro-batch", "per copy", "memory/copy", "note")]
    for r in pred["stages"]:
        note = f"{r['iterations']:.1f} iterations x {ms(r['per_iteration_s'])}" if "iterations" in r and unit else ("light" if not r["heavy"] else "")
        if "prelude_s" in r and unit:
            note += f" + prelude {ms(r['prelude_s'])}"
        mem = f"{r['memory_bytes'] / 2**20:.0f} MB" if unit else "-"
        rows.append((str(r["stage"]), str(r["copies"]), ms(r["time_s"]), ms(r["per_copy_s"]), mem, note))
    widths = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    eff = f"balance efficiency {pred['balance_efficiency']:.2f} (mean / slowest stage copy)"
    lines.append(f"  {eff}; period {ms(pred['period_s'])} per micro-batch"
                 + (f" (slowest copy {ms(pred['slowest_s'])}, shared cores {ms(pred['floor_s'])})" if pred.get("floor_s") else ""))
    if pred.get("throughput_rps"):
        lines.append(f"  throughput {pred['throughput_rps']:.2f} req/s steady state; latency of a micro-batch {ms(pred['latency_s'])}")
    if pred.get("microbatches"):
        b = pred.get("bubble")
        lines.append(f"  {pred['microbatches']} micro-batches: run {ms(pred['run_s'])}, bubble {100 * b:.0f}%" if b is not None else "")
    lines += [f"  note: {n}" for n in pred.get("notes", [])]
    return "\n".join(lines)


def versus_measured(pred: dict[str, Any], stats: dict[str, Any], sim: dict[str, Any] | None = None) -> dict[str, Any]:
    """Predicted next to measured, per stage (seconds of work per micro-batch, all copies
    together; loops also per iteration) and for the run (balance efficiency, throughput,
    bubble). ``stats``: the runtime's (``Recorder.stats``); ``sim``: a simulation of the
    same run (``SimResult.to_dict()``), whose per-stage busy time counts shared cores."""
    m = max(1, int(stats.get("microbatches") or 0))
    busy: dict[int, dict[str, float]] = {}
    for w in stats.get("stages", []):
        b = busy.setdefault(int(w["stage"]), {"busy_s": 0.0, "calls": 0})
        b["busy_s"] += float(w.get("busy_s", 0.0))
        b["calls"] += int(w.get("calls", 0))
    rows = []
    for r in pred.get("stages", []):
        got = busy.get(r["stage"], {"busy_s": 0.0, "calls": 0})
        row = {"stage": r["stage"], "copies": r["copies"], "heavy": r["heavy"], "predicted_s": r["time_s"], "measured_s": got["busy_s"] / m}
        if "iterations" in r:
            # per call of the stage, as measured: a prelude's time spreads over the calls
            row["predicted_iteration_s"] = r["per_iteration_s"] + r.get("prelude_s", 0.0) / r["iterations"]
            row["measured_iteration_s"] = got["busy_s"] / got["calls"] if got["calls"] else None
            row["predicted_iterations"], row["measured_iterations"] = r["iterations"], got["calls"] / m
        row["ratio"] = row["measured_s"] / row["predicted_s"] if row["predicted_s"] else None
        if sim is not None:
            row["simulated_s"] = sum(w["busy_s"] for w in sim["workers"] if w["stage"] == r["stage"]) / max(1, sim["microbatches"])
        rows.append(row)
    heavy = [x["measured_s"] / x["copies"] for x in rows if x["heavy"]]
    out: dict[str, Any] = {"microbatches": m, "stages": rows,
                           "balance_efficiency": {"predicted": pred.get("balance_efficiency"),
                                                  "measured": (sum(heavy) / len(heavy)) / max(heavy) if heavy and max(heavy) > 0 else None}}
    if pred.get("measured"):
        m_pred = bubble_for(pred["stages"], pred["period_s"], pred["latency_s"], m)
        items = sum(int(w.get("items", 0)) for w in stats.get("stages", []) if int(w.get("stage", -1)) == 0)
        out["throughput_rps"] = {"predicted": items / m_pred["run_s"] if m_pred["run_s"] and items else pred.get("throughput_rps"),
                                 "steady_state": pred.get("throughput_rps"), "measured": stats.get("throughput_rps")}
        out["bubble"] = {"predicted": m_pred["bubble"], "measured": (stats["bubble_pct"] / 100 if stats.get("bubble_pct") is not None else None)}
    if sim is not None:
        heavy_sim = [x["simulated_s"] / x["copies"] for x in rows if x["heavy"]]
        out["balance_efficiency"]["simulated"] = (sum(heavy_sim) / len(heavy_sim)) / max(heavy_sim) if heavy_sim and max(heavy_sim) > 0 else None
        out["throughput_rps"]["simulated"] = sim["throughput_rps"]
        out["bubble"]["simulated"] = sim["bubble"]
        out["latency_s"] = {"simulated_p50": sim["latency_p50_s"], "simulated_p95": sim["latency_p95_s"],
                            "measured_p50": stats.get("latency_p50_s"), "measured_p95": stats.get("latency_p95_s")}
    return out


def format_versus(cmp: dict[str, Any]) -> str:
    """Lines for the run's printed table: predicted vs measured per stage."""

    def unit_s(v: float | None) -> str:
        return f"{1000 * v:.1f} ms" if v is not None else "-"

    lines = ["predicted vs measured (work per micro-batch, all copies):"]
    for r in cmp["stages"]:
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "-"
        extra = ""
        if "predicted_iteration_s" in r:
            extra = (f"; per iteration {unit_s(r['predicted_iteration_s'])} vs {unit_s(r['measured_iteration_s'])}, "
                     f"iterations/mb {r['predicted_iterations']:.1f} vs {r['measured_iterations']:.1f}")
        sim = f", simulated {unit_s(r['simulated_s'])}" if "simulated_s" in r else ""
        lines.append(f"  stage {r['stage']}: predicted {unit_s(r['predicted_s'])}{sim}, measured {unit_s(r['measured_s'])} ({ratio}){extra}")
    be = cmp["balance_efficiency"]
    if be.get("measured") is not None:
        sim = f", simulated {be['simulated']:.2f}" if be.get("simulated") is not None else ""
        lines.append(f"  balance efficiency: predicted {be['predicted']:.2f}{sim}, measured {be['measured']:.2f}")
    if cmp.get("throughput_rps", {}).get("predicted"):
        t = cmp["throughput_rps"]
        sim = f", simulated {t['simulated']:.2f}" if t.get("simulated") is not None else ""
        lines.append(f"  throughput: predicted {t['predicted']:.2f} req/s for this run ({t['steady_state']:.2f} steady state){sim}, measured {t['measured']:.2f} req/s")
    b = cmp.get("bubble") or {}
    if b.get("predicted") is not None and b.get("measured") is not None:
        sim = f", simulated {100 * b['simulated']:.0f}%" if b.get("simulated") is not None else ""
        lines.append(f"  bubble: predicted {100 * b['predicted']:.0f}%{sim}, measured {100 * b['measured']:.0f}%")
    return "\n".join(lines)
