"""``mmpipe profile`` and ``mmpipe plan --simulate``: measure a recipe's parts, and predict runs.

``profile`` compiles the recipe with one piece per part (``compile_loaded(mode="profile")``),
claims the output directory as ``run`` does, measures (``runtime/profile.py``), prints the
table, writes ``profile.json`` (and ``profile.png`` with ``--chart``), then compiles the
recipe again with the new profile to show the balancer's choice and its predictions.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def cmd_profile(loaded: Any, a: Any) -> int:
    """Measure, save, explain (see the module docstring); the exit code."""
    from mmpipe.api import requests_of
    from mmpipe.dsl.compile import compile_loaded
    from mmpipe.rundir import claim, point_latest
    from mmpipe.run import _raw
    from mmpipe.runtime.profile import format_profile, measure

    plan = compile_loaded(loaded, mode="profile")
    raw_out = _raw(loaded.cfg, "output_dir")
    rd = claim(Path(plan.output_dir), False, bool(loaded.cfg.get("overwrite", False)), timestamped="${now:" in raw_out)
    try:
        if "${now:" in raw_out:
            point_latest(rd.path)
        reqs = requests_of(plan)
        k = a.microbatches or 3
        quiet = getattr(a, "quiet", False)
        print(f"profiling {plan.recipe}: {sum(len(pn.pieces) for pn in plan.nodes.values())} pieces, 1 warm-up + {k} timed micro-batch(es) "
              f"of {plan.runtime.get('microbatch_size')} request(s)", file=sys.stderr)
        prof = measure(plan, reqs, microbatches=k, warmup=1, output_dir=str(rd.path), log=None if quiet else (lambda m: print(m, file=sys.stderr)))
        if a.co_run:
            _co_run(loaded, plan, reqs, k, prof, str(rd.path), None if quiet else (lambda m: print(m, file=sys.stderr)))
        prof.host["hop_s"] = round(_hop(), 7)
        path = prof.save(rd.path / "profile.json")
        print(format_profile(prof))
        balanced = _with_profile(loaded, path)
        if balanced is not None and balanced.predicted:
            from mmpipe.dsl.predict import format_prediction

            print(f"\nwith this profile ({', '.join(balanced.stage_label(s) for s in balanced.stages)}):")
            print(format_prediction(balanced.predicted, balanced))
        if a.chart:
            try:
                from mmpipe.runtime.draw import profile_chart

                print(f"chart -> {profile_chart(prof, balanced, rd.path / 'profile.png')}")
            except ImportError as exc:  # the profile itself is written
                print(f"note: no chart: {exc} (pip install matplotlib)", file=sys.stderr)
        print(f"profile -> {path}\nuse it: mmpipe plan {a.recipe} {' '.join(a.overrides)} profile={path}".rstrip())
        return 0
    finally:
        rd.release()


def _co_run(loaded: Any, plan: Any, reqs: list[Any], k: int, prof: Any, out_dir: str, log: Any) -> None:
    """``--co-run``: time every part again while the recipe runs on every other core
    (``mmpipe/corun.py``) and set each part's ``corun`` factor in ``prof``."""
    import os

    from mmpipe.corun import co_runners
    from mmpipe.dsl.costs import intra_op_threads, set_corun
    from mmpipe.runtime.profile import measure

    if any(not pl.device.startswith("cpu") for st in plan.stages for pl in st.places):
        print("note: --co-run measures parts on CPU cores only: not measured", file=sys.stderr)
        return
    threads = intra_op_threads(plan.runtime)
    n = (os.cpu_count() or 1) // max(1, threads) - 1
    if n < 1:
        print(f"note: --co-run: no other core for the recipe beside {threads} intra-op thread(s): not measured", file=sys.stderr)
        return
    skip = ("output_dir=", "overwrite=", "profile=", "trace=")
    overrides = [o for o in loaded.overrides if not o.lstrip("+").startswith(skip)]
    print(f"co-run: starting {n} process(es) of {plan.recipe} on the other core(s), then timing every part again", file=sys.stderr)
    try:
        with co_runners(str(loaded.path), overrides, n, threads):
            beside = measure(plan, reqs, microbatches=k, warmup=1, output_dir=out_dir, log=log)
    except RuntimeError as exc:  # the profile alone still holds: save it without the factors
        print(f"note: --co-run: not measured: {exc}", file=sys.stderr)
        return
    set_corun(prof, beside)
    prof.host["corun"] = {"co_runners": n, "cpu_share": beside.host.get("cpu_share")}


def _hop() -> float:
    """The runtime's own cost per stage call here (no-op synthetic stages through the threads backend)."""
    from mmpipe.api import requests_of
    from mmpipe.dsl.compile import compile_recipe
    from mmpipe.runtime.profile import hop_overhead

    plan = compile_recipe("synthetic", ["stages=4", "work=noop", "requests=200", "runtime=threads", "runtime.microbatch_size=1",
                                        "batching.max_delay_ms=0"])
    return hop_overhead(plan, requests_of(plan))


def _with_profile(loaded: Any, path: Path) -> Any:
    """The recipe compiled with the new profile (its own cuts, or the balancer's); None when
    that fails (the profile was still written)."""
    from mmpipe.dsl.compile import compile_loaded
    from mmpipe.dsl.errors import RecipeError
    from mmpipe.dsl.load import load_recipe

    overrides = [o for o in loaded.overrides if not o.lstrip("+").startswith("profile=")] + [f"profile={path}"]
    try:
        return compile_loaded(load_recipe(str(loaded.path), overrides))
    except RecipeError as exc:
        print(f"note: the recipe does not compile with this profile:\n{exc.format()}", file=sys.stderr)
        return None


def print_simulation(plan: Any, a: Any) -> int:
    """``mmpipe plan --simulate``: the discrete-event simulation of the plan's run."""
    from mmpipe.dsl.errors import Problem, RecipeError, Where
    from mmpipe.dsl.simulate import format_simulation, simulate_plan

    if not plan.predicted or not plan.predicted.get("measured"):
        raise RecipeError([Problem("profile", "--simulate needs measured costs", "run `mmpipe profile RECIPE ...` and add profile=PATH",
                                   Where(file=plan.file))])
    res = simulate_plan(plan, microbatches=a.schedule)
    if a.format == "json":
        import json

        print(json.dumps(res.to_dict(), indent=2))
    else:
        print(plan.to_text())
        from mmpipe.dsl.predict import format_prediction

        print(format_prediction(plan.predicted, plan))
        print(format_simulation(res, plan))
    return 0
