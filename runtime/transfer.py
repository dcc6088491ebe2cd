"""Moving a stage's outputs to a consumer stage's device.

The producer calls ``Mover.move`` right after computing, so the copy overlaps
the consumer's work on the previous micro-batch. With CUDA on either side the
copy runs on a side stream, ordered after the producer's compute stream by an
event; host memory is pinned so the copy is truly asynchronous; the returned
event is what the consumer waits on (``wait_ready``) before reading. Without
CUDA (CPU, MPS) the move is a plain synchronous ``to_device`` and the event is
None: the same code path runs under plain pytest on a CPU-only machine.
"""
from __future__ import annotations

from typing import Any

from mmpipe.runtime.batch import to_device


def _is_cuda(dev: Any) -> bool:
    return str(dev).startswith("cuda")


class Mover:
    """Copies values from ``src`` to ``dst`` (one per producer/consumer device pair)."""

    def __init__(self, src: str, dst: str) -> None:
        import torch

        self.src, self.dst = torch.device(src), torch.device(dst)
        self.noop = self.src == self.dst
        self.cuda = not self.noop and (_is_cuda(src) or _is_cuda(dst)) and torch.cuda.is_available()
        self._stream: Any = None

    def move(self, values: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """``values`` on ``dst`` and an event to wait on (None when already usable)."""
        if self.noop:
            return values, None
        if not self.cuda:
            return to_device(values, self.dst), None
        import torch

        # The copy engine lives with a GPU: the destination's when it is one.
        side_dev = self.dst if self.dst.type == "cuda" else self.src
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=side_dev)
        side = self._stream
        if self.src.type == "cuda":
            side.wait_stream(torch.cuda.current_stream(self.src))  # after the producer's kernels
        with torch.cuda.stream(side):
            out = self._copy(values, side)
            done = torch.cuda.Event()
            done.record(side)
        return out, done

    def _copy(self, v: Any, side: Any) -> Any:
        import torch

        if isinstance(v, torch.Tensor):
            if v.device == self.dst:
                return v
            if v.device.type == "cuda":
                v.record_stream(side)  # keep the source alive until the copy ran
            if self.dst.type == "cpu":
                out = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                out.copy_(v, non_blocking=True)
                return out
            if v.device.type == "cpu" and not v.is_pinned():
                v = v.pin_memory()
            return v.to(self.dst, non_blocking=True)
        if isinstance(v, dict):
            return {k: self._copy(x, side) for k, x in v.items()}
        if isinstance(v, list):
            return [self._copy(x, side) for x in v]
        if isinstance(v, tuple):
            return tuple(self._copy(x, side) for x in v)
        return v


def wait_ready(event: Any, device: str) -> None:
    """Make ``device``'s work (or the host, for a CPU consumer) wait for a transfer."""
    if event is None:
        return
    import torch

    if _is_cuda(device):
        torch.cuda.current_stream(torch.device(device)).wait_event(event)
    else:
        event.synchronize()


def bind_cuda_device(dev: str) -> None:
    """Make ``dev`` the calling thread's current CUDA device (``cuda`` means ``cuda:0``)."""
    if not _is_cuda(dev):
        return
    import torch

    torch.cuda.set_device(torch.device(dev).index or 0)
