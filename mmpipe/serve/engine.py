"""The served pipeline: loads once, admits a bounded number of requests, runs each through
``Pipeline.submit`` (so requests of all clients share micro-batches), and gives up on a
request when its client leaves or its time is up (``Pipeline.cancel`` frees its loop lane).
"""
from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from mmpipe.serve.openai_shapes import ApiError

log = logging.getLogger("mmpipe.serve")

# pipeline error types that are the client's fault (bad audio, a bad per-request value)
CLIENT_ERRORS = ("UserError", "AudioError", "SourceError")


@dataclass
class Settings:
    """What ``mmpipe serve`` was told on its command line."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 256  # requests admitted at once (in the pipeline); more get 503
    timeout_s: float = 300.0  # a request still unfinished after this is cancelled (504)
    grace_s: float = 30.0  # SIGTERM: how long requests in flight may take to finish


class Engine:
    """One pipeline shared by every HTTP request (see the module docstring)."""

    def __init__(self, plan: Any, settings: Settings) -> None:
        self.plan = plan
        self.settings = settings
        self.pipe: Any = None
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.active = 0  # admitted and not yet answered (the event loop's thread only)
        self.started = time.time()
        self.work_dir = Path(tempfile.mkdtemp(prefix="mmpipe-serve-"))  # uploads and files nodes write
        self.on_load_failed: Callable[[], None] | None = None  # the server stops: nothing to serve

    # ------------------------------------------------------------ lifecycle
    def load(self) -> None:
        """Build every piece (weights load here); /health says ready afterwards."""
        from mmpipe.api import open_pipeline

        try:
            self.pipe = open_pipeline(self.plan, str(self.work_dir / "out"))
        except Exception as exc:  # a missing model, a bad device: said once, then the server stops (exit 2)
            from mmpipe.graphs.base import UserError

            self.load_error = f"{exc.key}: {exc.message}" + (f" (fix: {exc.fix})" if exc.fix else "") if isinstance(exc, UserError) \
                else f"{type(exc).__name__}: {exc}"
            log.debug("loading the pipeline failed", exc_info=True)
            if self.on_load_failed is not None:
                self.on_load_failed()
            return
        self.ready.set()

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None
        import shutil

        shutil.rmtree(self.work_dir, ignore_errors=True)

    # ------------------------------------------------------------ requests
    def new_id(self, kind: str) -> str:
        return f"{kind}-{uuid.uuid4().hex[:16]}"

    def admit(self, n: int = 1) -> None:
        """Take ``n`` places in the bounded admission queue, or answer 503 at once."""
        if not self.ready.is_set():
            raise ApiError(503, self.load_error or "the model is still loading", "server_error", headers={"Retry-After": "5"})
        if self.active + n > self.settings.max_queue:
            raise ApiError(503, f"the server is full ({self.active} requests in flight, at most {self.settings.max_queue}); retry later",
                           "server_overloaded", headers={"Retry-After": "1"})
        self.active += n

    def release(self, n: int = 1) -> None:
        self.active -= n

    def in_flight(self) -> int:
        return int(self.pipe.table.in_flight()) if self.pipe is not None else 0

    def submit(self, request: Any, on_progress: Callable[[Any, Any], None] | None = None) -> "asyncio.Future[Any]":
        """Hand an admitted request to the pipeline. Whatever happens to whoever waits for it
        (a stream never read, a client gone), its admission place comes back when the
        pipeline resolves it, and ``timeout_s`` later it is cancelled if still running."""
        loop = asyncio.get_running_loop()
        try:
            cf = self.pipe.submit(request, on_progress=on_progress)
        except BaseException:
            self.release()
            raise
        why = f"the request did not finish within {self.settings.timeout_s:g} s (--request-timeout)"
        timer = loop.call_later(self.settings.timeout_s, self.pipe.cancel, request.id, why)

        def resolved(_: Any) -> None:  # a pipeline thread
            loop.call_soon_threadsafe(self.release)
            loop.call_soon_threadsafe(timer.cancel)

        cf.add_done_callback(resolved)
        return asyncio.wrap_future(cf, loop=loop)

    async def wait(self, request: Any, fut: "asyncio.Future[Any]", disconnected: Callable[[], Awaitable[bool]]) -> Any:
        """The request's ``Result``; a client that leaves cancels it in the pipeline (its loop
        lanes are freed at their next pass)."""
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=0.25)
                if done:
                    return fut.result()
                if await disconnected():
                    self.pipe.cancel(request.id, "the client disconnected")
                    raise ApiError(499, "the client disconnected", "client_closed_request")
        except asyncio.CancelledError:  # the server is shutting down, or the stream's reader left
            self.pipe.cancel(request.id, "the client disconnected")
            raise

    async def run(self, request: Any, disconnected: Callable[[], Awaitable[bool]]) -> Any:
        """``submit`` then ``wait``."""
        return await self.wait(request, self.submit(request), disconnected)

    @staticmethod
    def check_result(res: Any, audio_field: str | None = None) -> dict[str, Any]:
        """A result's outputs, or the error as an HTTP error: 400 for the client's mistakes,
        500 naming the stage and node for failures inside the pipeline. ``audio_field``: the
        request field that carried the audio (named by a 400 about the audio itself)."""
        if res.ok:
            return dict(res.outputs or {})
        err = res.error or {}
        if err.get("type") in CLIENT_ERRORS:
            param = audio_field if err.get("type") == "AudioError" else _param_of(err)
            raise ApiError(400, str(err.get("message")), "invalid_request_error", param)
        if err.get("type") == "Cancelled":  # by the timer of ``submit`` (a client gone hears nothing)
            raise ApiError(504, str(err.get("message")), "timeout")
        where = f"stage {err.get('stage')}, node {err.get('node')}"
        raise ApiError(500, f"the pipeline failed ({where}): {err.get('type')}: {err.get('message')}", "server_error")


def _param_of(err: dict[str, Any]) -> str | None:
    """``params.language`` in a node's UserError key -> the request field ``language``."""
    msg = str(err.get("key") or "")
    return msg.split(".", 1)[1] if msg.startswith("params.") else None
