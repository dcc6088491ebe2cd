"""The distributed backend through the CLI: several processes (gloo, CPU) give the threads
backend's results, exactly; faults end every rank within a bound and keep finished results.

Both sides run with one intra-op thread per process (``OMP_NUM_THREADS=1`` for the
threads backend, ``runtime.threads_per_rank=1`` for the ranks): the thread count
changes float rounding in some kernels, and "equal" here means bit for bit.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cli import mmpipe

ROOT = Path(__file__).resolve().parents[2]
CLIPS = ROOT / "tests" / "assets" / "speech"


# The ranks (torch's launcher starts them) import tests.unit.runtime.kinds, SYNTH's allow_targets,
# from this checkout; one intra-op thread per process keeps results bit-equal (see above): the
# threads backend gets it from OMP_NUM_THREADS, the ranks from runtime.threads_per_rank (so a
# distributed run's own environment leaves OMP alone, and its command can start warm).
RANK_ENV = {"PYTHONPATH": str(ROOT)}
THREADS_ENV = {**RANK_ENV, "OMP_NUM_THREADS": "1"}


def results(out: Path) -> dict[str, dict[str, Any]]:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {r["id"]: r for r in rows}


def outputs(out: Path) -> dict[str, Any]:
    return {rid: r.get("outputs", r.get("error")) for rid, r in results(out).items()}


def run_ok(*args: str, out: Path) -> subprocess.CompletedProcess:
    r = mmpipe("run", *args, f"output_dir={out}", "-q", env=RANK_ENV if "runtime=distributed" in args else THREADS_ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


DIST = ["runtime=distributed", "runtime.threads_per_rank=1"]

SYNTH = """
defaults: [{placement: cpu}, {runtime: threads}, _self_]
name: dist_synth
inputs: {x: {type: tensor}, trips: {type: tensor}}
outputs: {y: c.y, loop: b.y, n: b.n, x: a.y}
source: {kind: synthetic.requests, count: 24, width: 4, max_trips: 5}
allow_targets: [tests.unit.runtime.kinds]
nodes:
  fan: {_target_: tests.unit.runtime.kinds.Fanout, in: {x: inputs.x}}
  a: {kind: synthetic.chain, in: {x: fan.y}, parts: 2, split: 2, work: noop}
  b: {kind: synthetic.loop, in: {x: a.y, trips: inputs.trips}, parts: 3, split: 3, work: noop}
  c: {kind: synthetic.chain, in: {x: a.y}, parts: 1, work: noop}
batching: {max_batch_size: 8, max_delay_ms: 1}
runtime: {microbatch_size: 3}
"""


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A fan-out, a split chain, a pipelined loop with random trip counts and edges that
    skip stages; its threads-backend results."""
    d = tmp_path_factory.mktemp("synth")
    recipe = d / "dist_synth.yaml"
    recipe.write_text(textwrap.dedent(SYNTH))
    run_ok(str(recipe), out=d / "threads")
    return recipe, outputs(d / "threads")


@pytest.mark.parametrize("extra", [
    ["runtime.nproc=2"],
    ["runtime.nproc=3"],
    # the loop and the chain before it as two copies each, spread over ranks
    ["runtime.nproc=3", "placement.b=[rank1,rank2]", "nodes.a.replicas=2"],
    ["runtime.nproc=3", "runtime.transport=gloo"],  # the messages through gloo, as between hosts
], ids=["2 ranks", "3 ranks", "3 ranks, replicas", "3 ranks over gloo"])
def test_synthetic_over_ranks_equals_threads(synth: tuple[Path, dict[str, Any]], tmp_path: Path, extra: list[str]) -> None:
    recipe, ref = synth
    run_ok(str(recipe), *DIST, *extra, out=tmp_path)
    assert outputs(tmp_path) == ref
    summary = json.loads((tmp_path / "summary.json").read_text())
    nproc = int(extra[0].split("=")[1])
    assert sorted(summary["ranks"]) == [str(k) for k in range(nproc)]
    # ranks of one host talk over Unix sockets unless told to use gloo
    way = "gloo" if "runtime.transport=gloo" in extra else "unix"
    assert {k: r["links"] for k, r in summary["ranks"].items()} == {
        str(k): {str(j): way for j in range(nproc) if j != k} for k in range(nproc)}
    assert {s["rank"] for s in summary["stages"]} == set(range(nproc))
    assert all((tmp_path / "logs" / f"rank{k}.log").exists() for k in range(nproc))
    # each request's compute time per stage comes back from every rank it went through
    booked = {k for r in results(tmp_path).values() for k in r["timings"]["stages_s"]}
    assert booked == {f"stage{s['stage']}" for s in summary["stages"]}


@pytest.fixture(scope="module")
def whisper_ref(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("whisper") / "threads"
    run_ok("whisper_stt", f"input={CLIPS}/clip*.wav", "nodes.encoder.split=2", "nodes.decoder.split=2", out=out)
    return outputs(out)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ["runtime.nproc=2"],
    ["runtime.nproc=3"],
    ["runtime.nproc=2", "placement.encoder=[rank0,rank1]"],
    # the decode loop's first stage runs the encoder's tail; what it makes goes to the other rank's side stores
    ["runtime.nproc=2", "nodes.decoder.with_previous=true"],
    # encoder parts 0-3 | 4-7 | 8-11 on ranks 0, 1, 0: the first hand-over is cut between layer
    # 1's attention head groups (h, qkv and the first group's attention go over the wire)
    ["runtime.nproc=2", "nodes.encoder.split=3", "+placement.encoder.1=rank1"],
], ids=["2 ranks", "3 ranks", "encoder replicated", "decode loop takes in the encoder's tail", "encoder cut between head groups"])
def test_whisper_over_ranks_equals_threads(whisper_ref: dict[str, Any], tmp_path: Path, extra: list[str]) -> None:
    run_ok("whisper_stt", f"input={CLIPS}/clip*.wav", "nodes.encoder.split=2", "nodes.decoder.split=2", *DIST, *extra,
           f"trace={tmp_path}/trace.json", out=tmp_path)
    assert outputs(tmp_path) == whisper_ref
    trace = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    nproc = int(extra[0].split("=")[1])
    assert {e["pid"] for e in trace if e["ph"] == "X"} == set(range(nproc))  # one process per rank, one time line


def pixels(out: Path) -> dict[str, Any]:
    from PIL import Image

    return {rid: Image.open(r["outputs"]["path"]).tobytes() for rid, r in results(out).items()}


@pytest.fixture(scope="module")
def sd_ref(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    out = tmp_path_factory.mktemp("sd") / "threads"
    run_ok("sd_txt2img", "num_images_per_prompt=4", "num_inference_steps=4", "nodes.denoise.split=3", out=out)
    return outputs(out), pixels(out)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ["runtime.nproc=2", "nodes.denoise.split=2"],
    ["runtime.nproc=3", "nodes.denoise.split=3"],
    ["runtime.nproc=3", "nodes.denoise.split=2", "placement.denoise=[rank1,rank2]"],
], ids=["2 ranks", "3 ranks", "denoise replicated"])
def test_sd_over_ranks_equals_threads(sd_ref: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path, extra: list[str]) -> None:
    run_ok("sd_txt2img", "num_images_per_prompt=4", "num_inference_steps=4", *DIST, *extra, out=tmp_path)
    ref_out, ref_px = sd_ref
    got = outputs(tmp_path)
    assert {k: {**v, "path": Path(v["path"]).name} for k, v in got.items()} == {k: {**v, "path": Path(v["path"]).name} for k, v in ref_out.items()}
    assert pixels(tmp_path) == ref_px


# ------------------------------------------------------------------ faults
def ranks_of(marker: str) -> list[int]:
    r = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def start(out: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "mmpipe", "run", "synthetic", *DIST, "runtime.nproc=2", "stages=2", "work=sleep", "stage_ms=100",
            "requests=60", "runtime.microbatch_size=1", f"output_dir={out}", "-q", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def wait_results(out: Path, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        f = out / "results.jsonl"
        if f.exists() and len(f.read_text().splitlines()) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} results after {timeout} s")


def children(pid: int) -> list[int]:
    return sorted(int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split())


def test_a_killed_rank_ends_every_rank_and_keeps_finished_results(tmp_path: Path) -> None:
    p = start(tmp_path)
    try:
        wait_results(tmp_path, 5)
        rank1 = children(p.pid)[1]
        os.kill(rank1, signal.SIGKILL)
        _, err = p.communicate(timeout=60)  # the bound: well under a minute
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 1
    assert "rank 1 (stage 1" in err and ("SIGKILL" in err or "was lost" in err), err
    assert ranks_of(f"output_dir={tmp_path}") == []  # no orphans
    rows = list(results(tmp_path).values())
    assert sum("outputs" in r for r in rows) >= 5  # finished before the kill: still there


def test_sigint_stops_every_rank_and_keeps_finished_results(tmp_path: Path) -> None:
    p = start(tmp_path)
    try:
        wait_results(tmp_path, 3)
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole process group
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130
    assert ranks_of(f"output_dir={tmp_path}") == []
    rows = results(tmp_path)
    assert len(rows) >= 3 and all("outputs" in r for r in rows.values())
    assert json.loads((tmp_path / "summary.json").read_text())["interrupted"] is True


def test_a_hung_rank_is_named_after_the_peer_timeout(tmp_path: Path) -> None:
    p = start(tmp_path, "runtime.peer_timeout_s=2")
    rank1 = None
    try:
        wait_results(tmp_path, 3)
        rank1 = children(p.pid)[1]
        os.kill(rank1, signal.SIGSTOP)
        _, err = p.communicate(timeout=60)
    finally:
        if rank1 is not None and rank1 in ranks_of(f"output_dir={tmp_path}"):
            os.kill(rank1, signal.SIGCONT)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 1
    assert "rank 1 (stage 1" in err and "sent nothing for 2 s" in err, err
    time.sleep(0.5)
    assert ranks_of(f"output_dir={tmp_path}") == []


def test_a_node_error_fails_only_its_request(tmp_path: Path) -> None:
    r = mmpipe("run", "synthetic", *DIST, "runtime.nproc=2", "stages=2", "work=noop", "requests=20",
               "+nodes.chain.fail_ids=[r0007]", f"output_dir={tmp_path}", "-q", env=RANK_ENV)
    assert r.returncode == 1, r.stderr
    rows = results(tmp_path)
    failed = {k: v["error"] for k, v in rows.items() if "error" in v}
    assert list(failed) == ["r0007"] and failed["r0007"]["node"] == "chain" and failed["r0007"]["type"] == "InjectedFailure"
    assert len(rows) == 20


def test_a_device_missing_on_a_rank_is_a_user_error(tmp_path: Path) -> None:
    import torch

    if torch.cuda.device_count() > 4:
        pytest.skip("this machine has that GPU")
    r = mmpipe("run", "synthetic", *DIST, "runtime.nproc=2", "stages=2", "work=noop", "placement.chain.1=rank1:cuda:4",
               f"output_dir={tmp_path}", "-q", env=RANK_ENV, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "placement.chain" in r.stderr and "rank 1" in r.stderr and "cuda:4" in r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------ two hosts
def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_hosts() -> Any:
    """Two network namespaces joined by a veth pair: two hosts, 10.77.x.1 and 10.77.x.2.
    Removed afterwards, also when the test fails."""
    import shutil

    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns)")
    tag = f"{os.getpid() % 200}"
    ns = [f"mmp{tag}a", f"mmp{tag}b"]
    veth = [f"mmv{tag}a", f"mmv{tag}b"]
    addr = [f"10.77.{tag}.1", f"10.77.{tag}.2"]
    try:
        for n in ns:
            _ip("netns", "add", n)
        _ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for n, v, a in zip(ns, veth, addr):
            _ip("link", "set", v, "netns", n)
            _ip("-n", n, "addr", "add", f"{a}/24", "dev", v)
            _ip("-n", n, "link", "set", v, "up")
            _ip("-n", n, "link", "set", "lo", "up")
        yield ns, veth, addr
    finally:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


@pytest.mark.slow
def test_whisper_across_two_hosts_with_torchrun(two_hosts: Any, whisper_ref: dict[str, Any], tmp_path: Path) -> None:
    ns, veth, addr = two_hosts
    torchrun = str(Path(sys.executable).parent / "torchrun")
    procs = []
    for k in range(2):
        cmd = ["ip", "netns", "exec", ns[k], "env", f"GLOO_SOCKET_IFNAME={veth[k]}", f"PYTHONPATH={ROOT}",
               torchrun, "--nnodes=2", "--nproc-per-node=1", f"--node-rank={k}", f"--master-addr={addr[0]}", "--master-port=29577",
               "-m", "mmpipe", "run", "whisper_stt", f"input={CLIPS}/clip*.wav", "nodes.encoder.split=2", "nodes.decoder.split=2",
               *DIST, f"output_dir={tmp_path}", "-q"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True))
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outputs(tmp_path) == whisper_ref
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(summary["ranks"]) == ["0", "1"] and {s["rank"] for s in summary["stages"]} == {0, 1}
    # two network namespaces cannot share a Unix socket: the messages went over gloo, on the veth
    assert summary["ranks"]["0"]["links"] == {"1": "gloo"} and summary["ranks"]["1"]["links"] == {"0": "gloo"}
    assert (tmp_path / "logs" / "rank1.log").exists()  # the other host's log came over the link
