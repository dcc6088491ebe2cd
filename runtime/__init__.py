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
        import os

        from mmpipe.graphs.base import UserError
        from mmpipe.runtime.dist_pipeline import DistributedPipeline

        if "RANK" not in os.environ:
            raise UserError("runtime.backend", "the distributed backend runs in processes started by `mmpipe run` or torchrun",
                            "run `mmpipe run RECIPE runtime=distributed runtime.nproc=N`, or torchrun ... -m mmpipe run RECIPE runtime=distributed")
        return DistributedPipeline(plan, output_dir)
    raise ValueError(f"unknown runtime backend {name!r}")
