"""The pipelined runtime's driver (``runtime.backend=threads``): one worker thread per stage copy.

Requests go through a batcher thread (``supervise.py``, ``batching.py``) that
cuts them into micro-batches; stage workers (``core.py``, ``stage.py``) take
packets from bounded inboxes (back-pressure), run their node pieces and hand
results on without any flush between micro-batches; loop bodies re-circulate
items with continuous batching (``loop.py``); values for non-adjacent stages
go through side stores (``channels.py``). Workers reach each other only through
the ``Fabric`` (``fabric.py``). Results are assembled by the request table
(``requests.py``) as soon as a request's last item leaves the last stage, and
each request's ``Future`` is resolved.

Failures stay local: a node error fails only the requests it touched (after
retrying the micro-batch item by item); a watchdog fails what is left, with a
message naming the stage, when a stage stops making progress for
``runtime.timeout_s``; ``close`` joins every thread. The interface matches
``SequentialExecutor`` (the oracle), plus ``submit`` and ``stream``. After a
stall the pipeline stays stopped (every later request fails at once with the
stall's message) until ``close()`` and ``start()``.

The distributed backend (``dist_pipeline.py``) is this driver on rank 0 with a
fabric that reaches the other ranks.
"""
from __future__ import annotations

import queue
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from mmpipe.dsl.plan import Plan
from mmpipe.graphs.base import ItemMeta, Request
from mmpipe.runtime.batching import LengthFn
from mmpipe.runtime.channels import SLICE_S
from mmpipe.runtime.core import THREAD_PREFIX, Core  # noqa: F401  (THREAD_PREFIX re-exported)
from mmpipe.runtime.fabric import Fabric
from mmpipe.runtime.requests import RequestTable
from mmpipe.runtime.results import Result
from mmpipe.runtime.supervise import Batcher

Progress = Callable[[Result], None]
CLOSE_GRACE_S = 5.0  # how long close() waits for a node call that does not return


class Pipeline:
    """Runs a plan as a pipeline of stage workers (see the module docstring)."""

    def __init__(self, plan: Plan, output_dir: str | None = None, length_of: LengthFn | None = None) -> None:
        """``length_of``: a request's length for ``batching.length_buckets`` (default:
        ``params["length"]``, else the size of its largest tensor input)."""
        self.plan = plan
        self.output_dir = output_dir
        self.length_of = length_of
        self.fabric = self._make_fabric()
        self.routes = self.fabric.routes
        self.core = Core(self.fabric, output_dir)
        self.recorder = self.core.recorder
        self.table = RequestTable(plan, self.fabric.times, self.recorder.request_done, self._retired)
        self.fabric.table = self.table
        self._started = False
        self._built = False
        self.batcher: Batcher | None = None

    def _make_fabric(self) -> Fabric:
        return Fabric(self.plan, 0)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "Pipeline":
        """Build every piece (weights load here) and start the threads."""
        if self._started:
            return self
        if not self._built:
            self.core.build()
            self._built = True
        self.fabric.stop_event.clear()
        self.fabric.broken = None
        self.batcher = Batcher(self.fabric, self.recorder, self.length_of)
        self._started = True
        self.core.start([(self.batcher.run, "batcher")], self.table.in_flight)
        return self

    def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Stop and join every thread; unfinished requests get an error result."""
        if not self._started:
            self.core.insts.clear()
            self._built = False
            return
        if self.batcher is not None:
            self.batcher.wake()
        self.core.stop(grace_s)
        self.table.fail_all({"type": "Closed", "message": self.fabric.broken or "the pipeline was closed before the request finished",
                             "stage": None, "node": None})
        for store in self.fabric.stores.values():
            store.clear()
        self._started = False
        self.core.insts.clear()
        self._built = False

    def __enter__(self) -> "Pipeline":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ public API
    def submit(self, request: Request, on_progress: Callable[[ItemMeta, Any], None] | None = None) -> "Future[Result]":
        """Queue one request; the future resolves to its ``Result`` (errors included).
        ``on_progress(item, progress)``: loops that report partial progress call it."""
        return self._submit([request], flush=False, on_progress=on_progress)[0]

    def cancel(self, request_id: str, why: str = "cancelled by the client") -> None:
        """Give up on a request: its future resolves with a ``Cancelled`` error and its items
        are dropped wherever they are (a loop frees their lanes on their next pass)."""
        self.table.fail([request_id], {"type": "Cancelled", "message": why, "stage": None, "node": None})

    def stream(self, requests: Iterable[Request], on_progress: Callable[[ItemMeta, Any], None] | None = None) -> Iterator[Result]:
        """Results in completion order. Ctrl-C closes the pipeline (finished results stay in ``completed``).
        ``on_progress(item, progress)``: as for ``submit``, for every request."""
        reqs = list(requests)
        if self.table.idle():  # a new measurement starts when the pipeline is idle
            self.recorder.reset()
            self.table.reset_completed()
        done: "queue.SimpleQueue[Future[Result]]" = queue.SimpleQueue()
        futures = self._submit(reqs, flush=True, on_done=done.put, on_progress=on_progress)
        try:
            for _ in futures:
                while True:
                    try:
                        fut = done.get(timeout=SLICE_S * 4)
                        break
                    except queue.Empty:
                        continue  # the watchdog guarantees every future resolves
                yield fut.result()
        except KeyboardInterrupt:
            self.close()
            raise

    def run(self, requests: list[Request], progress: Progress | None = None,
            on_progress: Callable[[ItemMeta, Any], None] | None = None) -> list[Result]:
        """Results in request order (like the sequential executor); ``progress`` per finished
        request, ``on_progress`` per loop step of an unfinished item (see ``submit``)."""
        by_id: dict[str, Result] = {}
        try:
            for res in self.stream(requests, on_progress):
                by_id[res.id] = res
                if progress:
                    progress(res)
        except KeyboardInterrupt:  # also when raised by ``progress``, outside the generator
            self.close()
            raise
        return [by_id[r.id] for r in requests]

    @property
    def completed(self) -> list[Result]:
        """Results of the current run()/stream() as they finish (still there after Ctrl-C)."""
        return self.table.completed

    @property
    def insts(self) -> dict[tuple[str, int], Any]:
        """(node, piece) -> the built piece (copy 0)."""
        return self.core.first_insts()

    def stats(self, wall_s: float) -> dict[str, Any]:
        return self.recorder.stats(wall_s)

    def recent_logs(self, since: float) -> list[Any]:
        """Every stage copy's worker log (``WorkerLog``; spans that end after ``since`` are
        the ones that matter: the distributed driver fetches only those from other ranks)."""
        return self.recorder.all_logs()

    def write_trace(self, path: str | Path) -> Path:
        """Chrome trace JSON of the spans recorded since the last ``run`` began."""
        return self.recorder.write_trace(path)

    def store_size(self) -> int:
        """Values held in side stores (0 once every request finished)."""
        return self.fabric.store_size()

    # ------------------------------------------------------------ requests
    def _submit(self, reqs: list[Request], flush: bool, on_done: Callable[[Any], None] | None = None,
                on_progress: Callable[[ItemMeta, Any], None] | None = None) -> "list[Future[Result]]":
        """Register the requests (futures) and hand them to the batcher."""
        if not self._started:
            self.start()
        futures = self.table.add(reqs, on_done, on_progress)
        if self.fabric.broken or self.fabric.stopping():
            self.table.fail_all({"type": "Stopped", "message": self.fabric.broken or "the pipeline is closed", "stage": None, "node": None})
            return futures
        assert self.batcher is not None
        self.batcher.submit(reqs, flush)
        return futures

    def _retired(self, rids: list[str], failed: bool) -> None:
        self.fabric.retired(rids, failed)
