"""The distributed backend (``runtime=distributed``): one process per rank, torch.distributed between them.

Rank 0 is the driver: ``DistributedPipeline`` is the threads backend's
``Pipeline`` (batcher, request table, collector) with a ``DistFabric`` that
reaches the stage copies on other ranks. Every other rank runs ``serve_rank``:
it builds only the pieces of its own stage copies and serves them until the
driver says stop, or a peer is lost.

Start-up is collective, before any message flows: every rank checks its
devices and builds its pieces, and the driver learns of any failure
(``setup``); rank 0 then measures each rank's clock offset, so one Chrome
trace can hold every rank's spans on one time line (``sync_clocks``).
"""
from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from mmpipe.dsl.plan import Plan
from mmpipe.graphs.base import UserError
from mmpipe.runtime.batching import LengthFn
from mmpipe.runtime.core import Core
from mmpipe.runtime.dist_fabric import DistFabric, thread_count
from mmpipe.runtime.dist_link import Link
from mmpipe.runtime.dist_local import open_local
from mmpipe.runtime.pipeline import CLOSE_GRACE_S, Pipeline
from mmpipe.runtime.trace import WorkerLog

log = logging.getLogger("mmpipe.dist")
T = TypeVar("T")
STATS_WAIT_S = 10.0


def interruptible(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a helper thread while this (main) thread waits in Python, so Ctrl-C
    and SIGTERM still arrive while a collective waits for a peer that is gone."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    t = threading.Thread(target=body, name="mmpipe-collective", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.1)
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def init_group(plan_timeout_s: float) -> None:
    """Join the process group torchrun (or the launcher) described in the environment."""
    if not dist.is_initialized():
        interruptible(lambda: dist.init_process_group("gloo", timeout=timedelta(seconds=max(300.0, plan_timeout_s))))


def rank_info(threads: int, link: Link | None = None) -> dict[str, Any]:
    """A rank's entry in ``summary.json``; with the link, how it reaches each other rank."""
    info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "threads": threads,
                            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if link is not None:
        info["links"] = {str(k): link.transport(k) for k in link.peers}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        info["peak_cuda_mb"] = round(sum(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())) / 2**20, 1)
    return info


def stages_of(plan: Plan, rank: int) -> str:
    """A rank's stage copies, for messages: ``stages 2-3 (decoder.0, decoder.1)``."""
    mine = [(st.index, plan.stage_label(st)) for st in plan.stages for p in st.places if p.rank == rank]
    if not mine:
        return "no stages"
    return f"stage{'s' if len(mine) > 1 else ''} {', '.join(str(i) for i, _ in mine)} ({'; '.join(n for _, n in mine)})"


def _gpu(dev: str) -> str:
    return "cuda:0" if dev == "cuda" else dev


def setup(core: Core, threads: int) -> list[dict[str, Any]]:
    """Collective: check devices and build this rank's pieces; every rank's status, in rank order."""
    from mmpipe.dsl.stages import device_available, machine_devices

    status: dict[str, Any] = {"ok": True, **rank_info(threads), "cuda": torch.cuda.is_available(),
                              "gpus": sorted({_gpu(core.fabric.device_of(a)) for a in core.addrs if core.fabric.device_of(a).startswith("cuda")})}
    t0 = time.perf_counter()
    try:
        for s, r in core.addrs:
            dev = core.fabric.device_of((s, r))
            if not device_available(dev):
                node = core.plan.stages[s].owner
                raise UserError(f"placement.{node}", f"device '{dev}' is not available on rank {core.fabric.rank} ({socket.gethostname()})",
                                f"that host has: {', '.join(machine_devices())}; place {node} elsewhere")
        core.build()
    except UserError as exc:
        status.update(ok=False, user=(exc.key, exc.message, exc.fix))
    except Exception as exc:
        status.update(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
    status["setup_s"] = round(time.perf_counter() - t0, 3)
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, status)
    return every


def raise_setup_failure(plan: Plan, every: list[dict[str, Any]]) -> None:
    """On any rank: raise the first rank's failure (a UserError stays one)."""
    for k, st in enumerate(every):
        if st["ok"]:
            continue
        if "user" in st:
            key, message, fix = st["user"]
            raise UserError(key, message if k == 0 else f"rank {k}: {message}", fix)
        raise RuntimeError(f"rank {k} ({stages_of(plan, k)}) failed to start: {st['error']}\n{st.get('trace', '')}")


def sync_clocks(rounds: int = 8) -> float:
    """Collective: this rank's offset onto rank 0's ``perf_counter`` (0 on rank 0), by the
    round trip with the smallest delay (NTP's rule)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    buf = torch.zeros(1, dtype=torch.float64)
    offset = torch.zeros(1, dtype=torch.float64)
    for k in range(1, world):
        if rank == 0:
            best = (float("inf"), 0.0)
            for _ in range(rounds):
                t0 = time.perf_counter()
                dist.send(torch.tensor([t0], dtype=torch.float64), k)
                dist.recv(buf, k)
                t1 = time.perf_counter()
                best = min(best, (t1 - t0, (t0 + t1) / 2 - float(buf[0])))
            dist.send(torch.tensor([best[1]], dtype=torch.float64), k)
        elif rank == k:
            for _ in range(rounds):
                dist.recv(buf, 0)
                dist.send(torch.tensor([time.perf_counter()], dtype=torch.float64), 0)
            dist.recv(offset, 0)
    return float(offset[0])


def nccl_groups(plan: Plan, every: list[dict[str, Any]], rank: int) -> tuple[tuple[Any, Any] | None, set[int]]:
    """Collective: with ``runtime.transport=auto`` and GPU stages on two or more ranks, two
    NCCL groups (one per direction) and the peers this rank reaches over NCCL: those whose
    GPUs are not its own (another host, or other devices of this host; NCCL refuses two
    ranks on one GPU, so those stage through host memory)."""
    gpu_ranks = [k for k, st in enumerate(every) if st["cuda"] and st["gpus"]]
    if plan.runtime.get("transport", "auto") != "auto" or len(gpu_ranks) < 2:
        return None, set()
    up = dist.new_group(ranks=gpu_ranks, backend="nccl")
    down = dist.new_group(ranks=gpu_ranks, backend="nccl")
    if rank not in gpu_ranks:
        return None, set()
    mine = every[rank]
    peers = {k for k in gpu_ranks if k != rank and (every[k]["host"] != mine["host"] or not set(every[k]["gpus"]) & set(mine["gpus"]))}
    return (up, down), peers


class _Ranks:
    """What the driver and the other ranks share: the link, clock offset, control messages."""

    def __init__(self, plan: Plan, fabric: DistFabric, core: Core, output_dir: str | None) -> None:
        self.plan, self.fabric, self.core, self.output_dir = plan, fabric, core, output_dir
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        self.threads = thread_count(int(plan.runtime.get("threads_per_rank", 0)), local)
        torch.set_num_threads(self.threads)
        self.offset = 0.0
        self.lost: str | None = None  # why the run lost a rank
        self.stop_asked = threading.Event()
        self.stats_cond = threading.Condition()
        self.stats_got: dict[int, Any] = {}
        self.stats_token = 0

    def connect(self) -> None:
        """Collective: build, check, sync clocks, then start the link."""
        every = interruptible(setup, self.core, self.threads)
        raise_setup_failure(self.plan, every)
        self.hosts = {k: st["host"] for k, st in enumerate(every)}
        self.pids = {k: st["pid"] for k, st in enumerate(every)}
        self.offset = interruptible(sync_clocks)
        nccl, peers = interruptible(nccl_groups, self.plan, every, self.rank)
        auto = self.plan.runtime.get("transport", "auto") == "auto"
        local = interruptible(open_local, self.rank, self.world, auto)
        self.fabric.control = self.control
        link = Link(self.rank, self.world, self.fabric.on_message, self.on_lost, float(self.plan.runtime.get("peer_timeout_s", 30)), nccl, peers,
                    local)
        self.fabric.link = link
        link.start()
        log.info("rank %d on %s: %s, %d threads, ready", self.rank, self.hosts[self.rank], stages_of(self.plan, self.rank), self.threads)

    def on_lost(self, peer: int, why: str, hung: bool = False) -> None:
        self.lost = f"rank {peer} ({stages_of(self.plan, peer)}) was lost: {why}"
        log.error(self.lost)
        if hung and self.hosts.get(peer) == self.hosts.get(self.rank):
            # A hung rank of this job on this host: end it, or it would outlive the run
            # (a launcher's grace period does not move a stopped process).
            try:
                os.kill(self.pids[peer], signal.SIGKILL)
            except OSError:
                pass
        if self.rank == 0:
            self.fabric.stall(-1, "", self.lost, kind="RankLost")
        self.stop_asked.set()

    def control(self, src: int, msg: Any) -> None:
        kind = msg[0]
        if kind == "stats?":  # ("stats?", token, since): worker logs, only spans ended after ``since`` (None: all)
            logs = [lg.export(self.offset, msg[2]) for lg in self.core.recorder.logs]
            self.fabric._send(src, ("stats", msg[1], logs, rank_info(self.threads, self.fabric.link)))
        elif kind == "stats":
            with self.stats_cond:
                if msg[1] == self.stats_token:
                    self.stats_got[src] = (msg[2], msg[3])
                    self.stats_cond.notify_all()
        elif kind == "reset":
            self.core.recorder.reset()
        elif kind == "stop":
            if self.fabric.link is not None:
                self.fabric.link.close()  # from now on a peer that goes away is no failure
            self.stop_asked.set()
            self.fabric.stop_event.set()
            self.fabric.wake_all()
        elif kind == "log" and self.output_dir:
            path = Path(self.output_dir) / "logs" / f"rank{src}.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(msg[1] + "\n")

    def remote_stats(self, wait_s: float = STATS_WAIT_S, since: float | None = None) -> dict[int, Any]:
        """Every other rank's worker logs and memory (rank 0 asks, they answer within ``wait_s``);
        ``since``: only spans that ended after it (this rank's clock)."""
        with self.stats_cond:
            self.stats_token += 1
            self.stats_got = {}
            token = self.stats_token
        assert self.fabric.link is not None
        self.fabric.link.broadcast(("stats?", token, since))
        deadline = time.monotonic() + wait_s
        alive = [k for k in range(1, self.world) if k not in self.fabric.link.lost]
        with self.stats_cond:
            while len(self.stats_got) < len(alive) and time.monotonic() < deadline:
                self.stats_cond.wait(0.05)
            return dict(self.stats_got)


def _logs_of(got: dict[int, Any]) -> list[WorkerLog]:
    """The worker logs in ``remote_stats``'s answers, by rank."""
    return [WorkerLog.load(d) for k in sorted(got) for d in got[k][0]]


class LinkLogHandler(logging.Handler):
    """Sends a rank's log lines to rank 0, which writes them under the run's output dir."""

    def __init__(self, fabric: DistFabric) -> None:
        super().__init__(logging.INFO)
        self.fabric = fabric
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if self.fabric.link is None:
            return
        try:
            self.fabric.link.send(0, ("log", self.format(record)))
        except Exception:
            pass  # the driver is gone: nowhere to log to


class DistributedPipeline(Pipeline):
    """The driver (rank 0): the ``Pipeline`` API over every rank's stage copies."""

    def __init__(self, plan: Plan, output_dir: str | None = None, length_of: LengthFn | None = None) -> None:
        init_group(float(plan.runtime.get("timeout_s", 600)))
        if dist.get_rank() != 0:
            raise RuntimeError("the driver is rank 0; other ranks run serve_rank()")
        if dist.get_world_size() != plan.nproc:
            raise UserError("runtime.nproc", f"the plan asks for {plan.nproc} ranks but {dist.get_world_size()} were started",
                            f"start {plan.nproc} processes, or set runtime.nproc={dist.get_world_size()}")
        super().__init__(plan, output_dir, length_of)
        self.ranks = _Ranks(plan, self.fabric, self.core, output_dir)  # type: ignore[arg-type]
        self._connected = False
        self._fetched = False

    def _make_fabric(self) -> DistFabric:
        return DistFabric(self.plan, 0)

    def start(self) -> "DistributedPipeline":
        if self._started:
            return self
        if not self._connected:
            self.ranks.connect()
            self._connected = self._built = True
        super().start()
        fabric: DistFabric = self.fabric  # type: ignore[assignment]
        for fn, name in ((fabric.run_collector, "collector"), (fabric.run_retirer, "retirer")):
            t = threading.Thread(target=fn, name=f"mmpipe-{name}", daemon=True)
            t.start()
            self.core.threads.append(t)
        return self

    def stats(self, wall_s: float) -> dict[str, Any]:
        self._fetch_remote()
        return super().stats(wall_s)

    def write_trace(self, path: str | Path) -> Path:
        self._fetch_remote()
        return super().write_trace(path)

    def _fetch_remote(self, wait_s: float = STATS_WAIT_S) -> None:
        """The other ranks' worker logs and memory. After ``close`` the ranks are gone: what
        ``close`` fetched on its way out is used."""
        if not self._connected:
            return
        rec = self.recorder
        got = self.ranks.remote_stats(wait_s)
        rec.remote = _logs_of(got)
        rec.ranks = {0: rank_info(self.ranks.threads, self.fabric.link), **{k: got[k][1] for k in got}}  # type: ignore[attr-defined]

    def recent_logs(self, since: float, wait_s: float = 2.0) -> list[WorkerLog]:
        """Every stage copy's worker log with the spans that ended after ``since`` (this
        clock): this process's own, and fresh copies from the other ranks."""
        logs = list(self.recorder.logs)
        if self._connected and self._started:
            logs += _logs_of(self.ranks.remote_stats(wait_s, since))
        return logs

    def stream(self, requests: Any, on_progress: Any = None) -> Any:
        if self.table.idle():
            self.ranks_reset()
        return super().stream(requests, on_progress)

    def ranks_reset(self) -> None:
        """A new measurement: the other ranks clear their logs too."""
        link = self.fabric.link  # type: ignore[attr-defined]
        if link is not None and self._connected:
            self.fabric.flush_retired()  # type: ignore[attr-defined]
            link.broadcast(("reset",))

    @property
    def lost(self) -> str | None:
        """Why a rank was lost during the run (None if none was)."""
        return self.ranks.lost

    def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        link = self.fabric.link  # type: ignore[attr-defined]
        if link is not None and self._connected:
            self._fetch_remote(wait_s=3.0)  # their logs, for stats and the trace, before they go
            link.broadcast(("stop",))
            link.flush()
            link.close()  # the ranks now exit: a late retire or heartbeat that fails is no loss
            self._connected = False
        super().close(grace_s)
        if link is not None:
            link.close()
        self._connected = False


def serve_rank(plan: Plan, output_dir: str | None) -> int:
    """A rank other than 0: build its stage copies, serve them until the driver says stop.
    Returns the process exit code (0 after a stop, 1 when a peer was lost)."""
    init_group(float(plan.runtime.get("timeout_s", 600)))
    rank = dist.get_rank()
    fabric = DistFabric(plan, rank)
    core = Core(fabric, output_dir)
    ranks = _Ranks(plan, fabric, core, output_dir)
    logging.getLogger("mmpipe").addHandler(LinkLogHandler(fabric))
    logging.getLogger("mmpipe").setLevel(logging.INFO)
    try:
        ranks.connect()
    except UserError:
        return 2  # rank 0 reports it
    except RuntimeError:
        return 1
    core.start([], None)
    code = 0
    try:
        while not ranks.stop_asked.wait(0.2):
            pass
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM reached this rank too: just stop
        code = 143 if type(exc).__name__ == "Terminated" else 130
        # When the whole job got the signal, let the driver stop first: it then keeps what
        # finished instead of seeing this rank vanish. A signal for this rank alone ends it.
        ranks.stop_asked.wait(2.0)
    left = core.stop(CLOSE_GRACE_S)
    if left:
        log.warning("rank %d: threads still running at exit: %s", rank, ", ".join(left))
    assert fabric.link is not None
    fabric.link.flush()  # log lines and replies still queued go out before the process ends
    fabric.link.close()
    return code or (1 if ranks.lost else 0)
