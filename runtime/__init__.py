"""Runtime: executes a compiled plan (knows nothing about Whisper or diffusion).

``make_executor(plan)`` picks the executor named by ``plan.runtime['backend']``:
``threads`` (the pipelined runtime), ``sequential`` (the reference oracle) or
``distributed`` (the driver on rank 0 of a torch.distributed job).
Every executor has ``start()``, ``run(requests, progress=None) -> list[Result]``,
``stats(wall_s) -> dict`` and ``close()``.
"""
from __future__ import annotations

from typing import Any


def make_executor(plan: Any, output_dir: str | None = None, backend: str | None = None) -> Any:
    """An executor for ``plan`` (not started)."""
    name = backend or plan.runtime.get("backend", "threads")
    if name == "sequential":
        from mmpipe.runtime.sequential import SequentialExecutor

        return SequentialExecutor(plan, output_dir)
    if name == "threads":
        from mmpipe.runtime.pipeline import Pipeline

        return Pipeline(plan, output_dir)
    if name == "distributed":
        from mmpipe.runtime.dist_pipeline import DistributedPipeline

        return DistributedPipeline(plan, output_dir)
    raise ValueError(f"unknown runtime backend {name!r}")
