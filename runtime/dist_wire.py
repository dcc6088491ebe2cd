"""Messages between ranks as byte frames: a small pickled header plus raw tensor bytes.

A message is any picklable Python value (a tuple ``(kind, ...)``). Tensors
inside it, at any depth, are not pickled: the pickler replaces each with a
reference (dtype, shape, offset) and their bytes follow the header, aligned,
in one buffer. Dynamic shapes, dicts of tensors and non-tensor values (strings,
lists, item metadata) all travel; nothing is preallocated from an earlier
message. Layout::

    [u64 total bytes][u64 header bytes][header pickle][pad][tensor bytes, each 64-aligned]

The receiver posts one receive of ``FRAME`` bytes (gloo accepts a smaller
send); a longer message sends its remainder as a second part of exact size,
into which its tensors are then views (no copy). Tensors on a GPU that the
peer reaches over NCCL are left out of the buffer (a reference with dtype,
shape and the receiver's device) and sent after it on an NCCL group.
"""
from __future__ import annotations

import copyreg
import ctypes
import io
import pickle
import struct
import threading
from typing import Any, Callable

import torch

FRAME = 1 << 16  # bytes of the first (fixed-size) receive
ALIGN = 64
_HEAD = struct.Struct("<QQ")
HEAD_BYTES = _HEAD.size  # a message's first bytes: its total size and header size


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


_LOCAL = threading.local()  # the tensors of the message being decoded (this thread)


def _tensor(i: int) -> torch.Tensor:
    t: torch.Tensor = _LOCAL.tensors[i]
    return t


def _gpu_tensor(i: int, dtype: str, shape: tuple[int, ...], device: str) -> torch.Tensor:
    if _LOCAL.gpu is None:
        raise pickle.UnpicklingError("a GPU tensor came without an NCCL receiver")
    t: torch.Tensor = _LOCAL.gpu(i, dtype, shape, device)
    return t


class _Pickler(pickle.Pickler):
    """Pickles tensors as references into the message's tensor list (a C-level
    dispatch-table lookup: no Python call for the other objects)."""

    def __init__(self, f: io.BytesIO, nccl_to: str | None) -> None:
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[torch.Tensor] = []
        self.gpu: list[torch.Tensor] = []
        self.nccl_to = nccl_to
        self.dispatch_table = copyreg.dispatch_table.copy()
        self.dispatch_table[torch.Tensor] = self._reduce
        self.dispatch_table[torch.nn.Parameter] = self._reduce

    def _reduce(self, obj: torch.Tensor) -> Any:
        t = obj.detach()
        if t.device.type == "cuda" and self.nccl_to is not None:
            self.gpu.append(t.contiguous())
            return _gpu_tensor, (len(self.gpu) - 1, str(t.dtype)[6:], tuple(t.shape), self.nccl_to)
        self.tensors.append(t)
        return _tensor, (len(self.tensors) - 1,)


def encode(msg: Any, nccl_to: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``msg`` as one uint8 CPU buffer, plus the GPU tensors to send over NCCL after it.

    ``nccl_to``: the receiver's GPU (``cuda:N`` on its host) when GPU tensors go over
    NCCL; otherwise they are copied to host memory into the buffer."""
    f = io.BytesIO()
    p = _Pickler(f, nccl_to)
    p.dump(msg)
    cpu = [t if t.device.type == "cpu" else t.cpu() for t in p.tensors]  # host staging for gloo
    cpu = [t if t.is_contiguous() else t.contiguous() for t in cpu]
    metas = []
    off = 0
    for t in cpu:
        nb = t.numel() * t.element_size()
        metas.append((str(t.dtype)[6:], tuple(t.shape), off, nb))
        off = _align(off + nb)
    table = pickle.dumps(metas, protocol=pickle.HIGHEST_PROTOCOL)
    body = f.getvalue()
    hlen = 8 + len(table) + len(body)
    data_start = _align(_HEAD.size + hlen)
    total = data_start + off
    raw = bytearray(total)
    _HEAD.pack_into(raw, 0, total, hlen)
    struct.pack_into("<Q", raw, _HEAD.size, len(table))
    a = _HEAD.size + 8
    raw[a: a + len(table)] = table
    raw[a + len(table): a + len(table) + len(body)] = body
    if cpu:
        base = ctypes.addressof(ctypes.c_char.from_buffer(raw))
        for t, (_, _, o, nb) in zip(cpu, metas):
            if nb:
                ctypes.memmove(base + data_start + o, t.data_ptr(), nb)
    return torch.frombuffer(raw, dtype=torch.uint8), p.gpu


def total_of(frame: torch.Tensor) -> int:
    """Total message size, read from the first bytes of a received frame."""
    return total_size(frame.numpy())


def total_size(head: Any) -> int:
    """Total message size, read from a buffer holding (at least) a message's first bytes."""
    return int(_HEAD.unpack_from(head)[0])


GpuRecv = Callable[[int, str, tuple[int, ...], str], torch.Tensor]


def decode(buf: torch.Tensor, copy: bool, gpu: GpuRecv | None = None) -> Any:
    """The message in ``buf`` (the whole message). ``copy``: the buffer will be reused,
    so tensors are copied out of it; otherwise they are views into it."""
    raw = buf.numpy().data  # a memoryview: the header is read through it, no copies
    _, hlen = _HEAD.unpack_from(raw)
    (tlen,) = struct.unpack_from("<Q", raw, _HEAD.size)
    a = _HEAD.size + 8
    metas = pickle.loads(raw[a: a + tlen])
    data_start = _align(_HEAD.size + hlen)
    tensors = []
    for dtype, shape, off, nb in metas:
        dt = getattr(torch, dtype)
        if nb == 0:
            tensors.append(torch.empty(shape, dtype=dt))
            continue
        t = buf[data_start + off: data_start + off + nb].view(dt).reshape(shape)
        tensors.append(t.clone() if copy else t)
    _LOCAL.tensors, _LOCAL.gpu = tensors, gpu
    try:
        return pickle.loads(raw[a + tlen: _HEAD.size + hlen])
    finally:
        _LOCAL.tensors, _LOCAL.gpu = [], None
