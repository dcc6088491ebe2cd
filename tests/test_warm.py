"""tests/warm.py, the CLI tests' fork server: a warm command behaves as a fresh
``python -m MODULE`` would (argv, cwd, environment, stdio, exit status, signals), and an
environment that torch reads at import time gets a cold start."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests import warm

PROBE = '''
import json, os, sys, time
warm = "torch" in sys.modules  # before anything of ours imports it
print(json.dumps({"warm": warm, "argv": sys.argv[1:], "cwd": os.getcwd(), "var": os.environ.get("PROBE_VAR"),
                  "path0": sys.path[0], "stdin": sys.stdin.read(), "pid": os.getpid()}), flush=True)
print("to stderr", file=sys.stderr)
if sys.argv[1:2] == ["sleep"]:
    time.sleep(60)
sys.exit(int(sys.argv[1]) if sys.argv[1:] and sys.argv[1].isdigit() else 0)
'''


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    if warm.bin_dir() is None:
        pytest.skip("MMPIPE_TEST_COLD=1")
    assert warm.ready(), "the warm server did not start"
    d = tmp_path_factory.mktemp("probe")
    (d / "warm_probe.py").write_text(PROBE)
    return warm.shim("warm_probe"), {**os.environ, "PYTHONPATH": str(d), "PROBE_VAR": "x y"}


def _run(probe: tuple[str, dict[str, str]], *args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    r = subprocess.run([probe[0], *args], input="from stdin", capture_output=True, text=True, cwd=Path(probe[1]["PYTHONPATH"]).parent,
                       env={**probe[1], **env}, timeout=120)
    return r, json.loads(r.stdout.splitlines()[0])


def test_a_warm_command_is_a_fresh_process_minus_the_import(probe: tuple[str, dict[str, str]]) -> None:
    r, seen = _run(probe, "3", "a b")
    assert seen["warm"] is True
    assert r.returncode == 3 and r.stderr == "to stderr\n"
    assert seen["argv"] == ["3", "a b"] and seen["var"] == "x y" and seen["stdin"] == "from stdin"
    cwd = str(Path(probe[1]["PYTHONPATH"]).parent)
    assert seen["cwd"] == cwd and seen["path0"] == cwd  # as `python -m` puts the working directory first
    assert seen["pid"] != os.getpid()


def test_an_import_time_variable_gets_a_cold_start(probe: tuple[str, dict[str, str]]) -> None:
    r, seen = _run(probe, "0", OMP_NUM_THREADS="1")
    assert r.returncode == 0 and seen["warm"] is False and seen["argv"] == ["0"]


def test_signals_reach_the_command_and_its_death_reaches_the_caller(probe: tuple[str, dict[str, str]]) -> None:
    p = subprocess.Popen([probe[0], "sleep"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, env=probe[1])
    seen = json.loads(p.stdout.readline())  # type: ignore[union-attr]
    assert seen["warm"] is True
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == -signal.SIGTERM


def test_a_killed_caller_takes_its_command_along(probe: tuple[str, dict[str, str]]) -> None:
    p = subprocess.Popen([probe[0], "sleep"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, env=probe[1])
    child = json.loads(p.stdout.readline())["pid"]  # type: ignore[union-attr]
    p.kill()
    p.wait()
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{child}")
    assert warm.ready(0)  # the server itself is still up
