"""The CLI as users run it: subprocesses, exit codes, files, Hydra conventions."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmpipe.dsl.plan import Plan
from tests.integration.cli import mmpipe

FAST = ["work=noop", "requests=6", "-q"]


def test_ls_lists_recipes_with_descriptions():
    r = mmpipe("ls")
    assert r.returncode == 0
    assert "synthetic" in r.stdout and "whisper_stt" in r.stdout and "sd_txt2img" in r.stdout


def test_help():
    r = mmpipe("--help")
    assert r.returncode == 0 and "mmpipe COMMAND" in r.stdout
    r = mmpipe("run", "synthetic", "--help")
    assert r.returncode == 0 and "config groups" in r.stdout and "runtime: distributed, sequential, threads" in r.stdout


@pytest.mark.parametrize("backend", ["sequential", "threads"])
def test_run_writes_results_and_summary(tmp_path, backend):
    out = tmp_path / "out"
    r = mmpipe("run", "synthetic", *FAST, f"runtime.backend={backend}", f"output_dir={out}")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [f"r{i:04d}" for i in range(6)]
    assert all("outputs" in x and len(x["outputs"]["y"]) == 16 and "latency_s" in x["timings"] for x in lines)
    s = json.loads((out / "summary.json").read_text())
    assert s["recipe"] == "synthetic" and s["requests"] == 6 and s["failed"] == 0
    assert s["config"]["runtime"]["backend"] == backend
    assert len(s["plan"]["stages"]) == 4 and len(s["stages"]) == 4
    assert s["latency_p50_s"] is not None and s["throughput_rps"] > 0


def test_failed_request_exits_1_and_others_complete(tmp_path):
    r = mmpipe("run", "synthetic", *FAST, "+nodes.chain.fail_ids=[r0003]", f"output_dir={tmp_path}")
    assert r.returncode == 1
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [("error" in x) for x in lines] == [False, False, False, True, False, False]
    assert lines[3]["error"]["node"] == "chain"


def test_user_error_exits_2_without_traceback(write_recipe):
    p = write_recipe("""
        defaults: [{runtime: threads}, _self_]
        name: bad
        inputs: {x: {type: tensor}}
        outputs: {y: a.y}
        source: {kind: synthetic.requests, count: 2}
        nodes:
          a: {kind: synthetic.chain, in: {x: inputs.x}, parts: 2, split: 3, stage_msec: 1}
          b: {kind: synthetic.chian, in: {x: a.y}}
          c: {kind: synthetic.chain, in: {x: aa.y}, dim: abc}
        batching: {max_batch_size: 0}
        """)
    r = mmpipe("validate", str(p))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("6 problems found:")
    for key in ("nodes.a.split", "nodes.a.stage_msec", "nodes.b.kind", "nodes.c.dim", "nodes.c.in.x", "batching.max_batch_size"):
        assert key in r.stderr
    assert r.stderr.count("recipe.yaml:") == 6 and r.stderr.count("fix:") == 6
    d = mmpipe("validate", str(p), "--debug")
    assert d.returncode == 2 and "Traceback" in d.stderr


def test_bad_override_and_unknown_recipe_exit_2():
    r = mmpipe("plan", "synthetic", "stagse=2")
    assert r.returncode == 2 and "did you mean 'stages'" in r.stderr and "Traceback" not in r.stderr
    r = mmpipe("plan", "synthetc")
    assert r.returncode == 2 and "did you mean 'synthetic'" in r.stderr
    r = mmpipe("frobnicate")
    assert r.returncode == 2


def test_validate_ok():
    r = mmpipe("validate", "synthetic", "stages=2")
    assert r.returncode == 0 and "2 stages" in r.stdout


@pytest.mark.parametrize("recipe", ["whisper_stt", "sd_txt2img"])
def test_plan_formats(recipe):
    r = mmpipe("plan", recipe)
    assert r.returncode == 0 and "stage" in r.stdout and "cpu" in r.stdout
    j = mmpipe("plan", recipe, "--format", "json")
    plan = Plan.from_json(j.stdout)
    assert plan.recipe == recipe and Plan.from_json(plan.to_json()) == plan
    m = mmpipe("plan", recipe, "--format=mermaid")
    assert m.stdout.startswith("flowchart LR")


def test_plan_placement_and_split_overrides():
    j = mmpipe("plan", "whisper_stt", "nodes.encoder.split=2", "nodes.decoder.split=2", "+placement.decoder.1=meta", "--format", "json")
    plan = Plan.from_json(j.stdout)
    labels = [(plan.stage_label(s), s.device) for s in plan.stages]
    assert [d for label, d in labels if label.startswith("decoder.1 ")] == ["meta"]
    assert [d for label, d in labels if label.startswith("decoder.0 ")] == ["cpu"]
    assert [d for label, d in labels if label.startswith("encoder.1 ")] == ["cpu"]
    import torch

    if torch.cuda.device_count() <= 5:  # no cuda:5 here: a user error naming the key
        r = mmpipe("plan", "whisper_stt", "placement.encoder=cuda:5")
        assert r.returncode == 2 and "placement.encoder" in r.stderr and "not available" in r.stderr


def test_cfg_job_prints_composed_config():
    r = mmpipe("run", "synthetic", "stages=2", "--cfg", "job")
    assert r.returncode == 0 and "stages: 2" in r.stdout and "${stages}" in r.stdout
    r = mmpipe("run", "synthetic", "stages=2", "--cfg", "job", "--resolve")
    assert "split: 2" in r.stdout


def test_multirun_sweep_one_output_dir_per_job(tmp_path):
    r = mmpipe("run", "synthetic", "-m", "stages=1,2", "work=noop", "requests=2", "-q", f"output_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    for i, stages in enumerate((1, 2)):
        s = json.loads((tmp_path / "multirun" / str(i) / "summary.json").read_text())
        assert len(s["plan"]["stages"]) == stages
        assert yaml.safe_load((tmp_path / "multirun" / str(i) / ".hydra" / "overrides.yaml").read_text())[0] == f"stages={stages}"


def test_console_script_and_user_recipe_with_shipped_groups(write_recipe, tmp_path):
    p = write_recipe("""
        # mmpipe run recipe.yaml
        defaults:
          - runtime: sequential
          - _self_
        name: mine
        inputs: {x: {type: tensor}}
        outputs: {y: c.y}
        source: {kind: synthetic.requests, count: 3}
        nodes:
          c: {kind: synthetic.chain, in: {x: inputs.x}, work: noop}
        """)
    exe = Path(sys.executable).with_name("mmpipe")
    r = subprocess.run([str(exe), "run", str(p), f"output_dir={tmp_path / 'o'}", "-q"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "o" / "results.jsonl").read_text().splitlines()) == 3


def test_the_command_skips_teardown_but_not_threads_or_exit_handlers(tmp_path):
    """``entry`` leaves with os._exit (no module teardown), after what Python's exit would do
    that a user can see: non-daemon threads finish, atexit handlers run, output is flushed."""
    code = ("import atexit, sys, threading, time\n"
            "import mmpipe.cli as cli\n"
            "done, real = threading.Event(), cli.main\n"
            "cli.main = lambda: (real(), done.set())[0]  # the thread outlives the command\n"
            "atexit.register(lambda: print('exit handler', flush=False))\n"
            "threading.Thread(target=lambda: (done.wait(), time.sleep(0.2), print('thread done', flush=False))).start()\n"
            "sys.argv = ['mmpipe', 'validate', 'synthetic']\n"
            "from mmpipe.__main__ import entry\n"
            "entry()\n"
            "print('not reached')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-2:] == ["thread done", "exit handler"]
    r = subprocess.run([sys.executable, "-c", code.replace("'synthetic'", "'nope'")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "unknown recipe 'nope'" in r.stderr and "exit handler" in r.stdout


def test_summary_records_resolved_model_paths(tmp_path):
    r = mmpipe("run", "whisper_stt", "-q", f"output_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "summary.json").read_text())
    enc = s["models"]["encoder"]
    assert enc["path"] == "package:tiny_en" and Path(enc["resolved_path"], "config.json").is_file()
