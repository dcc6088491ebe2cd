"""Running a plan on the distributed backend from the CLI.

``mmpipe run RECIPE runtime=distributed runtime.nproc=N`` (not under torchrun)
starts N local ranks with torch's own launcher (``torch.distributed``'s
elastic agent, as ``torchrun --standalone`` does), each running the same
command, and exits with rank 0's exit code; if a rank dies, the agent stops
the others and this process names the rank. Under torchrun (the environment
names a rank), the command runs as that rank: rank 0 is the driver (requests,
results, summary, trace), the others serve their stage copies.

``mmpipe serve`` launches with ``graceful=True``: SIGTERM and Ctrl-C sent to this
process go to rank 0 alone, which stops accepting, finishes the requests in
flight and then stops the other ranks; this process exits with rank 0's code.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from typing import Any, Callable

RANK_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DRIVER_PIDFILE = "MMPIPE_DRIVER_PIDFILE"  # where rank 0 writes its pid (graceful launches)


def in_rank_process() -> bool:
    """Started by torchrun or by our launcher (the environment describes a rank)."""
    return all(k in os.environ for k in RANK_ENV)


def rank_overrides(overrides: list[str]) -> list[str]:
    """Under torchrun without ``runtime.nproc``: the world size is the rank count."""
    if in_rank_process() and not any(o.lstrip("+").startswith("runtime.nproc=") for o in overrides):
        return overrides + [f"runtime.nproc={os.environ['WORLD_SIZE']}"]
    return overrides


def launch_local(plan: Any, argv: list[str], graceful: bool = False) -> int:
    """Start ``plan.nproc`` local ranks running ``mmpipe`` with ``argv``; rank 0's exit code.
    ``graceful``: signals go to rank 0 alone (see the module docstring)."""
    import shutil
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from mmpipe.runtime.dist_fabric import thread_count
    from mmpipe.runtime.dist_pipeline import stages_of

    n = plan.nproc
    # Each rank sets its own intra-op threads; this keeps OpenMP from oversubscribing before that.
    os.environ.setdefault("OMP_NUM_THREADS", str(thread_count(int(plan.runtime.get("threads_per_rank", 0)), n)))
    for name in list(logging.root.manager.loggerDict):  # we name a failed rank ourselves
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # the agent's own files (error reports it reads before returning) go to a folder removed
    # afterwards, not to a new /tmp/torchelastic_* per run; rank logs are in <output_dir>/logs
    agent_dir = tempfile.mkdtemp(prefix="mmpipe-launch-")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"mmpipe-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                          shutdown_timeout=15,  # room for rank 0 to save what finished after a signal
                          logs_specs=DefaultLogsSpecs(log_dir=agent_dir))
    try:
        launch = lambda: elastic_launch(config, entrypoint=sys.executable)("-m", "mmpipe", *argv)  # noqa: E731
        if graceful:
            _to_driver(launch)
        else:
            launch()
        return 0
    except ChildFailedError as exc:
        codes = {f.local_rank: f.exitcode for f in exc.failures.values()}
        dead = {k: c for k, c in codes.items() if k != 0 and (c < 0 or c not in (0, 1, 2, 130, 143))}
        first = sorted(dead)[0] if dead else None
        if first is not None:
            c = dead[first]
            how = f"was killed by {signal.Signals(-c).name}" if c < 0 else f"exited with code {c}"
            print(f"error: rank {first} ({stages_of(plan, first)}) {how}; the other ranks were stopped "
                  f"(finished results are in {plan.output_dir}/results.jsonl)", file=sys.stderr)
        code = codes.get(0, 0)
        if dead:  # the agent stopped rank 0 (SIGTERM) because another rank died: that is the failure
            return 2 if code == 2 else 1
        if code == 0:  # the driver finished: a rank's own exit code after that changes no result
            late = ", ".join(f"rank {k} exited with {c}" for k, c in sorted(codes.items()) if k and c)
            print(f"warning: {late} after the run ({plan.output_dir}/logs has their logs)", file=sys.stderr)
            return 0
        return code if code in (1, 2, 130, 143) else 1
    except SignalException as exc:  # Ctrl-C or SIGTERM: the agent passed it on to every rank
        return 143 if exc.sigval == signal.SIGTERM else 130
    except KeyboardInterrupt:
        return 130
    finally:
        shutil.rmtree(agent_dir, ignore_errors=True)


def _to_driver(launch: Callable[[], Any]) -> None:
    """Run ``launch`` in a helper thread (torch's agent then installs no signal handlers of
    its own) while this main thread passes SIGTERM and SIGINT on to rank 0 alone."""
    import tempfile
    from pathlib import Path

    from mmpipe.runtime.dist_pipeline import interruptible

    fd, pidfile = tempfile.mkstemp(prefix="mmpipe-driver-", suffix=".pid")
    os.close(fd)
    os.environ[DRIVER_PIDFILE] = pidfile

    def forward(signum: int, frame: Any) -> None:
        try:
            pid = int(Path(pidfile).read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        for target in [pid] if pid else _children():  # before rank 0 started: every rank
            try:
                os.kill(target, signum)
            except OSError:
                pass

    saved = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        interruptible(launch)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        os.environ.pop(DRIVER_PIDFILE, None)
        try:
            os.unlink(pidfile)
        except OSError:
            pass


def _children() -> list[int]:
    """This process's child processes (Linux /proc; empty elsewhere)."""
    me, out = os.getpid(), []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == me:
                out.append(int(name))
    return out


def run_as_rank(plan: Any, run_driver: Callable[[Any], int]) -> int:
    """This process is a rank: rank 0 drives (``run_driver(plan)``), others serve.
    Rank 0 shares its plan so every rank runs the very same one."""
    import torch.distributed as dist

    from mmpipe.dsl.plan import Plan
    from mmpipe.runtime.dist_pipeline import init_group, interruptible, serve_rank

    init_group(float(plan.runtime.get("timeout_s", 600)))
    box: list[Any] = [plan.to_json() if dist.get_rank() == 0 else None]
    interruptible(dist.broadcast_object_list, box, 0)
    plan = Plan.from_json(box[0])
    if dist.get_rank() == 0:
        if os.environ.get(DRIVER_PIDFILE):
            with open(os.environ[DRIVER_PIDFILE], "w") as f:
                f.write(str(os.getpid()))
        return run_driver(plan)
    return serve_rank(plan, plan.output_dir)


def exit_now(code: int) -> None:
    """Leave without interpreter teardown: receiver threads may sit in a network receive
    that destroying the process group would abort."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
