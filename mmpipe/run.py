"""``mmpipe run``: claim the output directory, run the requests, write what they produced.

Before any weights load, the output directory is claimed (made, locked, checked
against an earlier run's results: ``rundir.py``) and ``trace=`` is checked.
Each result is appended to ``results.jsonl`` as it finishes; at the end the
file is rewritten in request order and ``summary.json`` is written atomically
(``"interrupted": true`` after Ctrl-C / SIGTERM, exit 130 / 143), with values
that came from resolvers such as ``${oc.env:VAR}`` redacted.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM: stop like Ctrl-C (finished results stay on disk), exit 143."""


_signalled: list[int] = []


def watch_signals() -> None:
    """SIGINT and SIGTERM stop a run the same way (main thread only)."""
    _signalled.clear()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def _on_signal(signum: int, frame: Any) -> None:
    """The first SIGINT/SIGTERM stops the run; repeats (a launcher passes the terminal's
    Ctrl-C on to every rank) are ignored while the run saves what finished (bounded)."""
    if _signalled:
        return
    _signalled.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def cmd_run(plan: Any, loaded: Any, quiet: bool = False, own_dir: bool = True) -> int:
    """Run the plan's requests (the driver, in a distributed run); the exit code.
    ``own_dir``: the output dir is the recipe's (not a sweep job's or Hydra's run dir)."""
    from mmpipe.rundir import check_writable_file, claim, point_latest, record_config

    stamped = own_dir and "${now:" in _raw(loaded.cfg, "output_dir")
    rd = claim(Path(plan.output_dir), bool(loaded.cfg.get("resume", False)), bool(loaded.cfg.get("overwrite", False)),
               timestamped=stamped)
    try:
        plan.output_dir = str(rd.path)
        if plan.trace:
            check_writable_file("trace", Path(plan.trace))
        config, secrets = redacted_config(loaded.cfg)
        record_config(rd.path, config, loaded.overrides)
        if stamped:
            point_latest(rd.path)
        return _run(plan, loaded, rd, config, secrets, quiet)
    finally:
        rd.release()


def _run(plan: Any, loaded: Any, rd: Any, config: dict[str, Any], secrets: dict[str, str], quiet: bool) -> int:
    from mmpipe.api import open_pipeline, requests_of, source_config
    from mmpipe.graphs import get_source
    from mmpipe.runtime.results import ResultsFile, summarize, write_atomic

    everything = requests_of(plan)
    order = [r.id for r in everything]
    requests = [r for r in everything if r.id not in rd.done_ids]
    out_dir = rd.path
    if plan.distributed:
        _rank_log(out_dir)
    out = ResultsFile(out_dir, rd.kept)
    if rd.done_ids and not quiet:
        print(f"resume: {len(everything) - len(requests)} of {len(everything)} requests already succeeded in {out_dir}", file=sys.stderr)
    bar: Any = None  # made once the models are loaded, so that its rate and ETA are the run's
    disk: list[str] = []

    def done(r: Any) -> None:
        try:
            out.write(r)
        except OSError as exc:  # a full disk: stop, keeping every line already written
            disk.append(f"results could not be written to {out.path}: {exc.strerror} ({len(out.written)} written)")
            raise
        if bar:
            bar.update(1)

    interrupted: int | None = None
    stats: dict[str, Any] = {}
    resolved: dict[str, str] = {}
    lost = None
    t_setup = time.perf_counter()
    ex = open_pipeline(plan, str(out_dir))
    setup_s = time.perf_counter() - t_setup
    bar = _progress(len(requests), quiet)
    steps = StepBars(quiet, position=1 if bar else 0)
    kw = {} if quiet else {"on_progress": steps.update}  # loop steps of unfinished items (pipelines report them)
    t0 = time.perf_counter()
    try:
        try:
            results = ex.run(requests, progress=done, **kw)
        except KeyboardInterrupt as exc:
            interrupted = 143 if isinstance(exc, Terminated) else 130
            results = list(out.written)
        except OSError:
            if not disk:
                raise
            interrupted, results = 1, list(out.written)
        wall = time.perf_counter() - t0
        stats = ex.stats(wall)
        resolved = _resolved_paths(ex)
        if hasattr(ex, "write_trace") and plan.trace:
            ex.write_trace(plan.trace)
            _timeline(ex, plan, quiet)
        lost = getattr(ex, "lost", None)
    finally:
        ex.close()
        steps.close()
        if bar:
            bar.close()
    if interrupted is None:
        out.finish(order)
    else:
        out.close()
    src_cls = get_source(plan.source["kind"]) if plan.source else None
    files = src_cls.write_outputs(source_config(plan), results, out_dir) if src_cls and not disk else []
    models = {n: {**pn.config["model"], **({"resolved_path": resolved[n]} if n in resolved else {})}
              for n, pn in plan.nodes.items() if isinstance(pn.config.get("model"), dict)}
    extra = {"setup_s": round(setup_s, 4), "overrides": loaded.overrides, "interrupted": interrupted is not None,
             "resumed": len(rd.kept), **({"lost": lost} if lost else {}), **({"disk_error": disk[0]} if disk else {})}
    if plan.predicted and stats.get("stages"):
        extra["predicted_vs_measured"] = _versus(plan, stats, len(results))
    summary = scrub(summarize(plan, results, wall, {**stats, **extra}, config, models), secrets)
    try:
        write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    except OSError as exc:
        disk.append(f"summary.json could not be written: {exc.strerror}")
    if not quiet:
        for r in results:
            print(_result_line(r))
        print(_stats_table(stats, summary))
        if summary.get("predicted_vs_measured"):
            from mmpipe.dsl.predict import format_versus

            print(format_versus(summary["predicted_vs_measured"]))
    failed = sum(not r.ok for r in results)
    for msg in ([lost] if lost and interrupted is None else []) + disk:
        print(f"error: {msg}", file=sys.stderr)
    if interrupted is not None:
        print(f"stopped: {len(results)}/{len(requests)} requests finished ({failed} failed) -> {out_dir}/results.jsonl", file=sys.stderr)
        return interrupted
    print(f"{len(results) - failed}/{len(results)} requests ok in {wall:.2f}s -> {out_dir}/results.jsonl" + (f" (+{len(files)} files)" if files else ""))
    return 1 if failed or disk else 0


# ------------------------------------------------------------------ recording the config
_RESOLVER = re.compile(r"\$\{\s*([\w.]+):")
SAFE_RESOLVERS = ("example", "now")  # ours: a shipped file, a time stamp


def _raw(cfg: Any, key: str) -> str:
    """The value of ``key`` as written (interpolations not resolved)."""
    try:
        node = cfg._get_node(key)
        return str(node._value()) if node is not None else ""
    except Exception:
        return ""


def redacted_config(cfg: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """The composed config, resolved, except values a resolver such as ``${oc.env:VAR}``
    made: those are recorded as written, so a shared recipe copies no secrets into
    outputs. Also returns secret value -> how it was written (to scrub it elsewhere)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    secrets: dict[str, str] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, DictConfig):
            return {k: walk_key(node, k) for k in node.keys()}
        if isinstance(node, ListConfig):
            return [walk_key(node, i) for i in range(len(node))]
        return node

    def walk_key(parent: Any, k: Any) -> Any:
        child = parent._get_node(k)
        raw = child._value() if child is not None else None
        if isinstance(raw, str) and any(m not in SAFE_RESOLVERS for m in _RESOLVER.findall(raw)):
            try:
                val = parent[k]
                if isinstance(val, str) and val:
                    secrets[val] = raw
            except Exception:
                pass
            return raw
        try:
            value = parent[k]
        except Exception:  # an interpolation that does not resolve: recorded as written
            return raw
        return walk(value) if OmegaConf.is_config(value) else value

    return walk(cfg), secrets


def scrub(obj: Any, secrets: dict[str, str]) -> Any:
    """Replace every secret value inside ``obj`` by how it was written."""
    if not secrets:
        return obj
    if isinstance(obj, dict):
        return {k: scrub(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v, secrets) for v in obj]
    if isinstance(obj, str):
        for value, raw in secrets.items():
            if value in obj:
                obj = obj.replace(value, raw)
    return obj


def _rank_log(out_dir: Path) -> None:
    """The driver's log file; the other ranks' lines arrive over the link (logs/rankK.log)."""
    import logging

    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    h = logging.FileHandler(out_dir / "logs" / "rank0.log")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("mmpipe")
    logger.addHandler(h)
    logger.setLevel(logging.INFO)


def _versus(plan: Any, stats: dict[str, Any], requests: int) -> dict[str, Any]:
    """Predicted (and, with a measured profile, simulated) next to measured, per stage."""
    from mmpipe.dsl.predict import versus_measured

    sim = None
    if plan.predicted.get("measured") and plan.predicted.get("profile") and requests:
        from mmpipe.dsl.simulate import simulate_plan

        try:
            sim = simulate_plan(plan, requests=requests).to_dict()
        except (ValueError, RuntimeError) as exc:  # a profile gone since compiling: no simulation
            print(f"note: no simulation: {exc}", file=sys.stderr)
    return versus_measured(plan.predicted, stats, sim)


def _timeline(ex: Any, plan: Any, quiet: bool) -> None:
    """The PNG timeline next to the Chrome trace (a drawing problem is a note, not a failure)."""
    rec = getattr(ex, "recorder", None)
    if rec is None or not plan.trace:
        return
    try:
        from mmpipe.runtime.draw import timeline_path, timeline_png

        png = timeline_png(rec.timeline(), timeline_path(plan.trace), title=plan.recipe)
        if not quiet:
            print(f"timeline -> {png}", file=sys.stderr)
    except Exception as exc:  # matplotlib missing or a font problem: the run itself is fine
        print(f"note: no timeline picture: {type(exc).__name__}: {exc}", file=sys.stderr)


def _resolved_paths(ex: Any) -> dict[str, str]:
    """Node -> the directory its weights were loaded from (kinds that report ``resolved_path``)."""
    out: dict[str, str] = {}
    for (node, _piece), inst in getattr(ex, "insts", {}).items():
        path = getattr(inst, "resolved_path", "")
        if path:
            out[node] = str(path)
    return out


def _bars_off() -> bool | None:
    """tqdm's ``disable``: None (only on a terminal), or False when MMPIPE_PROGRESS=1
    asks for bars in a log file too."""
    return False if os.environ.get("MMPIPE_PROGRESS") == "1" else None


def _progress(n: int, quiet: bool) -> Any:
    if quiet or n < 2:  # one request: its loop-step bar is its progress
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=n, desc="requests", unit="req", file=sys.stderr, disable=_bars_off(), leave=False)


class StepBars:
    """Per-step bars of the loops, fed by ``on_progress``: denoising steps (steps/s, with a
    total once every item in flight has said its step count) and decoded tokens (tok/s).
    A long single file shows here what its requests bar cannot."""

    def __init__(self, quiet: bool, position: int) -> None:
        self.quiet, self.position = quiet, position
        self.bars: dict[str, Any] = {}
        self.totals: dict[str, int] = {}
        self.lock = threading.Lock()  # loop threads of several stages may report at once

    def _bar(self, kind: str) -> Any:
        if kind not in self.bars:
            try:
                from tqdm import tqdm
            except ImportError:
                self.bars[kind] = None
                return None
            unit = "step" if kind == "denoise" else "tok"
            self.bars[kind] = tqdm(desc=kind, unit=unit, file=sys.stderr, disable=_bars_off(), leave=False,
                                   position=self.position + len(self.bars))
        return self.bars[kind]

    def update(self, item: Any, p: Any) -> None:
        if self.quiet or not isinstance(p, dict):
            return
        kind = "denoise" if "steps" in p else "decode"
        with self.lock:
            bar = self._bar(kind)
            if bar is None:
                return
            if kind == "denoise" and p.get("step") == 1:
                # a new item: its steps join the total, less the last (that one finishes the
                # item, which then reports as a finished request, not as a step)
                self.totals[kind] = self.totals.get(kind, 0) + int(p["steps"]) - 1
                bar.total = self.totals[kind]
            bar.update(1)

    def close(self) -> None:
        for bar in self.bars.values():
            if bar is not None:
                bar.close()


def _short(v: Any) -> str:
    if hasattr(v, "shape") and hasattr(v, "dtype"):
        flat = v.flatten().tolist()
        head = ", ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in flat[:4])
        return f"tensor{list(v.shape)} [{head}{', ...' if len(flat) > 4 else ''}]"
    s = str(v)
    return s if len(s) <= 100 else s[:97] + "..."


def _result_line(r: Any) -> str:
    if not r.ok:
        return f"{r.id}: ERROR {r.error.get('message')} (stage {r.error.get('stage')}, node {r.error.get('node')})"
    return f"{r.id}: " + "  ".join(f"{k}={_short(v)}" for k, v in (r.outputs or {}).items() if v not in (None, [], ""))


def _stats_table(stats: dict[str, Any], summary: dict[str, Any]) -> str:
    from mmpipe.runtime.trace import format_stats

    return format_stats({**stats, **{k: summary.get(k) for k in ("throughput_rps", "latency_p50_s", "latency_p95_s")}})


