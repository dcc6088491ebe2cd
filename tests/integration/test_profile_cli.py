"""mmpipe profile, plan with a profile (auto, --simulate, --format dot) and the pictures of a run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.cli import mmpipe

PNG = b"\x89PNG\r\n\x1a\n"


def check_chrome_trace(path: Path) -> list[dict]:
    """The Chrome trace event format: an object with traceEvents; complete events with
    pid, tid, ts and a non-negative dur; metadata events naming processes and threads."""
    data = json.loads(path.read_text())
    events = data["traceEvents"]
    assert isinstance(events, list) and events
    for ev in events:
        assert isinstance(ev["name"], str) and ev["ph"] in ("X", "M", "b", "e") and isinstance(ev["pid"], int)
        if ev["ph"] == "X":
            assert isinstance(ev["tid"], int) and ev["ts"] >= 0 and ev["dur"] >= 0
        if ev["ph"] == "M":
            assert ev["name"] in ("process_name", "process_sort_index", "thread_name", "thread_sort_index") and "args" in ev
    return events


def test_profile_balance_simulate_and_pictures(tmp_path: Path) -> None:
    prof_dir = tmp_path / "prof"
    r = mmpipe("profile", "synthetic", "stages=4", "stage_ms=2", "requests=8", f"output_dir={prof_dir}", "--chart", "--microbatches", "2")
    assert r.returncode == 0, r.stderr
    profile = prof_dir / "profile.json"
    assert json.loads(profile.read_text())["key"]["recipe"] == "synthetic"
    assert (prof_dir / "profile.png").read_bytes()[:8] == PNG
    assert "chain" in r.stdout and "ms/mb" in r.stdout and "balance efficiency" in r.stdout

    auto = ["stages=4", "stage_ms=2", f"profile={profile}", "nodes.chain.split=auto", "balance.stages=2"]
    r = mmpipe("plan", "synthetic", *auto)
    assert r.returncode == 0, r.stderr
    assert "2 stages" in r.stdout and "predicted (profile" in r.stdout and "balance efficiency" in r.stdout
    r = mmpipe("plan", "synthetic", *auto, "--simulate")
    assert r.returncode == 0, r.stderr
    assert "simulated run: 32 requests in 8 micro-batches" in r.stdout and "busy" in r.stdout
    r = mmpipe("plan", "synthetic", *auto, "--format", "dot")
    assert r.returncode == 0 and r.stdout.startswith("digraph plan {") and "stage 1" in r.stdout

    out = tmp_path / "run"
    r = mmpipe("run", "synthetic", *auto, "requests=16", f"output_dir={out}", f"trace={out}/run.trace.json")
    assert r.returncode == 0, r.stderr
    check_chrome_trace(out / "run.trace.json")
    assert (out / "run.timeline.png").read_bytes()[:8] == PNG
    s = json.loads((out / "summary.json").read_text())
    cmp = s["predicted_vs_measured"]
    assert [x["stage"] for x in cmp["stages"]] == [0, 1] and all(x["measured_s"] > 0 for x in cmp["stages"])
    assert 0 < cmp["balance_efficiency"]["predicted"] <= 1 and 0 < cmp["balance_efficiency"]["measured"] <= 1
    assert s["plan"]["predicted"]["period_s"] > 0 and s["plan"]["predicted"]["choice"]["pieces"]["chain"] == [[0, 2], [2, 4]]
    assert "predicted vs measured" in r.stdout


def test_profile_co_run_times_parts_beside_the_recipe_on_the_other_cores(tmp_path: Path) -> None:
    prof_dir = tmp_path / "prof"
    args = ["stages=2", "work=matmul", "dim=256", "requests=4", "runtime.threads_per_stage=1"]
    scratch = set(Path(tempfile.gettempdir()).glob("mmpipe-corun-*"))
    r = mmpipe("profile", "synthetic", *args, f"output_dir={prof_dir}", "--microbatches", "2", "--co-run", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    data = json.loads((prof_dir / "profile.json").read_text())
    if (os.cpu_count() or 1) < 2:
        assert "no other core" in r.stderr and "corun" not in data["host"]
        return
    assert data["host"]["corun"]["co_runners"] == (os.cpu_count() or 1) - 1
    factors = [p["corun"] for p in data["nodes"]["chain"]["parts"]]
    assert len(factors) == 2 and all(f >= 1.0 for f in factors)
    assert "co-run" in r.stdout and "starting" in r.stderr
    # the co-runners are gone (killed and reaped), their scratch folders too
    assert "-m mmpipe.corun" not in _processes()
    assert set(Path(tempfile.gettempdir()).glob("mmpipe-corun-*")) == scratch


def test_a_co_runner_that_cannot_start_is_reported(tmp_path: Path) -> None:
    from mmpipe.corun import co_runners

    with pytest.raises(RuntimeError, match="co-runner stopped before it ran the recipe once") as exc:
        with co_runners(str(tmp_path / "missing.yaml"), [], 1, 1):
            pass
    assert "missing.yaml" in str(exc.value)


def test_co_runners_exit_when_the_profiling_process_is_killed(tmp_path: Path) -> None:
    scratch = set(Path(tempfile.gettempdir()).glob("mmpipe-corun-*"))
    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from mmpipe.corun import co_runners\n"
        "with co_runners('synthetic', ['stages=2', 'work=noop', 'requests=4'], 1, 1):\n"
        "    print('running', flush=True)\n"
        "    time.sleep(600)\n")], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "running"
        assert "-m mmpipe.corun" in _processes()
        parent.kill()  # no cleanup runs: the co-runner must notice by itself
        parent.wait()
        deadline = time.monotonic() + 30
        while "-m mmpipe.corun" in _processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "-m mmpipe.corun" not in _processes()
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait()
        for d in set(Path(tempfile.gettempdir()).glob("mmpipe-corun-*")) - scratch:  # the killed parent could not
            shutil.rmtree(d, ignore_errors=True)


def _processes() -> str:
    return subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def test_a_profile_that_does_not_fit_is_a_user_error(tmp_path: Path) -> None:
    prof_dir = tmp_path / "prof"
    assert mmpipe("profile", "synthetic", "stages=2", "work=noop", "requests=4", f"output_dir={prof_dir}", "-q").returncode == 0
    r = mmpipe("plan", "synthetic", "stages=2", "work=noop", f"profile={prof_dir}/profile.json", "runtime.microbatch_size=2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"override 'profile={prof_dir}/profile.json'" in r.stderr and "microbatch_size is 4 there, 2 here" in r.stderr
    assert "fix:" in r.stderr
    r = mmpipe("plan", "synthetic", "stages=2", "--simulate")
    assert r.returncode == 2 and "--simulate needs measured costs" in r.stderr


def test_whisper_run_timeline_shows_the_decode_loop(tmp_path: Path) -> None:
    """One whisper run: Chrome trace, PNG timeline (loop iterations as boxes), Mermaid and DOT plans."""
    over = ["nodes.encoder.split=2", "nodes.decoder.split=2", "max_new_tokens=24"]
    for fmt, head in (("mermaid", "flowchart LR"), ("dot", "digraph plan {")):
        r = mmpipe("plan", "whisper_stt", *over, "--format", fmt)
        assert r.returncode == 0 and r.stdout.startswith(head) and "decoder" in r.stdout
    out = tmp_path / "w"
    r = mmpipe("run", "whisper_stt", *over, f"output_dir={out}", f"trace={out}/w.trace.json", "-q")
    assert r.returncode == 0, r.stderr
    events = check_chrome_trace(out / "w.trace.json")
    steps = [e for e in events if e["ph"] == "X" and e["name"].startswith("step")]
    assert len(steps) >= 4  # every decode iteration on both loop stages is a span
    assert (out / "w.timeline.png").read_bytes()[:8] == PNG
