"""``mmpipe serve RECIPE [overrides]``: the recipe's pipeline behind OpenAI-compatible HTTP
endpoints (FastAPI + uvicorn), loaded once, every client's requests sharing its micro-batches.

FastAPI, uvicorn and prometheus-client are imported only here (``pip install mmpipe[serve]``),
so the other commands stay fast and work without them.
"""
from __future__ import annotations

import logging
import signal
import socket
import sys
from typing import Any

from mmpipe.serve.engine import Settings

__all__ = ["Settings", "cmd_serve", "serve_plan"]


def cmd_serve(plan: Any, raw_argv: list[str], settings: Settings) -> int:
    """Serve ``plan`` (distributed recipes: this process starts the ranks, rank 0 serves)."""
    _need_packages()
    if plan.runtime.get("backend") == "sequential":
        from mmpipe.graphs.base import UserError

        raise UserError("runtime", "runtime=sequential runs one request at a time and cannot serve", "use runtime=threads (the default)")
    if plan.distributed:
        from mmpipe.launch import in_rank_process, launch_local, run_as_rank

        if in_rank_process():
            return run_as_rank(plan, lambda p: serve_plan(p, settings))
        return launch_local(plan, raw_argv, graceful=True)
    return serve_plan(plan, settings)


def serve_plan(plan: Any, settings: Settings) -> int:
    """Run the server until SIGTERM or Ctrl-C; 0 once requests in flight finished (or the
    grace period ran out)."""
    import uvicorn

    from mmpipe.run import Terminated
    from mmpipe.serve.app import create_app
    from mmpipe.serve.engine import Engine

    engine = Engine(plan, settings)
    sock = _bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(engine), log_level="warning", timeout_graceful_shutdown=int(max(settings.grace_s, 1)),
                            lifespan="on", access_log=False)
    server = uvicorn.Server(config)
    engine.on_load_failed = lambda: setattr(server, "should_exit", True)
    from mmpipe.launch import in_rank_process

    line = f"serving {plan.recipe} on http://{settings.host}:{port} (weights loading; GET /health says when ready)"
    if in_rank_process():  # a rank's console log is quiet: say where to connect anyway
        print(f"mmpipe: {line}", file=sys.stderr, flush=True)
    else:
        logging.getLogger("mmpipe").info(line)
    # uvicorn handles SIGTERM/SIGINT while it serves (stop accepting, finish what is in flight)
    # and raises the signal again once done: record it then, instead of mmpipe run's handler
    # that would interrupt the clean exit with a KeyboardInterrupt
    got: list[int] = []

    def record(signum: int, frame: Any) -> None:
        got.append(signum)
        server.should_exit = True  # also before uvicorn has its own handlers in place

    saved = {sig: signal.signal(sig, record) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt as exc:
        got.append(signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    finally:
        sock.close()
        engine.close()  # again: a signal during start-up skips the app's shutdown (it is idempotent)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    if signal.SIGINT in got:
        return 130
    if engine.load_error:
        print(f"error: {engine.load_error}", file=sys.stderr)
        return 2
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, made here so that ``--port 0`` can report the port it got."""
    from mmpipe.graphs.base import UserError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto
    # says TCP, and with Nagle on each response's body waited ~40 ms for the client's
    # delayed ACK (sd_txt2img served to 8 clients: 27 -> 33 req/s)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError("--port", f"cannot listen on {host}:{port}: {exc.strerror}", "choose another --port (0: any free one)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _need_packages() -> None:
    import importlib.util

    from mmpipe.graphs.base import UserError

    missing = [p for p, mod in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("python-multipart", "multipart"),
                                ("prometheus-client", "prometheus_client")) if importlib.util.find_spec(mod) is None]
    if missing:
        raise UserError("serve", f"mmpipe serve needs {', '.join(missing)}", "pip install 'mmpipe[serve]'")
