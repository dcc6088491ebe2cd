"""Messages between ranks as byte frames: a small pickled header plus raw tensor bytes.

A message is any picklable Python value (a tuple ``(kind, ...)``). Tensors
inside it, at any depth, are not pickled: the pickler replaces each with a
reference (dtype, shape, byte offset and size) and their bytes follow the
header, aligned, in one buffer. Dynamic shapes, dicts of tensors and non-tensor
values (strings, lists, item metadata) all travel; nothing is preallocated from
an earlier message. Layout::

    [u64 total bytes][u64 header bytes][header pickle][pad][tensor bytes, each 64-aligned]

The receiver posts one receive of ``FRAME`` bytes (gloo accepts a smaller
send); a longer message sends its remainder as a second part of exact size,
into which its tensors are then views (no copy). Tensors on a GPU that the
peer reaches over NCCL are left out of the buffer (a reference with dtype,
shape and the receiver's device) and sent after it on an NCCL group.

A receiver handles every message of its peer, and on a busy host each one
costs it a context switch with cold caches: so both ends keep to few Python
and torch calls per message (one pickle each way, no table of tensors apart
from the references inside it).
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
_DTYPES: dict[str, torch.dtype] = {}  # "float32" -> torch.float32 (filled as met)
_NAMES: dict[torch.dtype, str] = {}  # and back


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class _State(threading.local):
    """The message this thread is encoding or decoding (the picklers' hooks read it)."""

    tensors: list[tuple[int, int, torch.Tensor]]  # encoding: (offset, bytes, host tensor) in buffer order
    size: int = 0  # encoding: their bytes so far, aligned
    gpu: list[torch.Tensor]  # encoding: tensors for NCCL
    nccl_to: str | None = None
    raw: Any = None  # decoding: the buffer (bytes-like) the tensors view
    base: int = 0  # decoding: where the tensor bytes start in it
    copy: bool = False
    gpu_recv: "GpuRecv | None" = None


_S = _State()


def _reduce(t: torch.Tensor) -> Any:
    if t.is_cuda and _S.nccl_to is not None:
        g = t.detach().contiguous()
        _S.gpu.append(g)
        return _gpu_tensor, (len(_S.gpu) - 1, _name(g.dtype), tuple(g.shape), _S.nccl_to)
    if not t.is_cpu:
        t = t.detach().cpu()  # host staging for gloo and sockets
    if not t.is_contiguous():
        t = t.contiguous()
    off, nb = _S.size, t.nbytes
    _S.tensors.append((off, nb, t))
    _S.size = _align(off + nb)
    return _tensor, (_name(t.dtype), tuple(t.shape), off, nb)


_TABLE = copyreg.dispatch_table.copy()  # a C-level lookup: no Python call for other objects
_TABLE[torch.Tensor] = _reduce
_TABLE[torch.nn.Parameter] = _reduce


def _name(dtype: torch.dtype) -> str:
    name = _NAMES.get(dtype)
    if name is None:
        name = _NAMES[dtype] = str(dtype)[6:]
    return name


def _dtype(name: str) -> torch.dtype:
    dt = _DTYPES.get(name)
    if dt is None:
        dt = _DTYPES[name] = getattr(torch, name)
    return dt


def _tensor(dtype: str, shape: tuple[int, ...], off: int, nb: int) -> torch.Tensor:
    dt = _dtype(dtype)
    if nb == 0:
        return torch.empty(shape, dtype=dt)
    t = torch.frombuffer(_S.raw, dtype=dt, count=nb // dt.itemsize, offset=_S.base + off).view(shape)
    return t.clone() if _S.copy else t


def _gpu_tensor(i: int, dtype: str, shape: tuple[int, ...], device: str) -> torch.Tensor:
    if _S.gpu_recv is None:
        raise pickle.UnpicklingError("a GPU tensor came without an NCCL receiver")
    t: torch.Tensor = _S.gpu_recv(i, dtype, shape, device)
    return t


def encode(msg: Any, nccl_to: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``msg`` as one uint8 CPU buffer, plus the GPU tensors to send over NCCL after it.

    ``nccl_to``: the receiver's GPU (``cuda:N`` on its host) when GPU tensors go over
    NCCL; otherwise they are copied to host memory into the buffer."""
    _S.tensors, _S.size, _S.gpu, _S.nccl_to = [], 0, [], nccl_to
    f = io.BytesIO()
    p = pickle.Pickler(f, protocol=pickle.HIGHEST_PROTOCOL)
    p.dispatch_table = _TABLE
    try:
        p.dump(msg)
        tensors, size, gpu = _S.tensors, _S.size, _S.gpu
    finally:
        _S.tensors, _S.gpu = [], []
    body = f.getbuffer()
    hlen = len(body)
    data_start = _align(_HEAD.size + hlen)
    raw = bytearray(data_start + size)
    _HEAD.pack_into(raw, 0, data_start + size, hlen)
    raw[_HEAD.size: _HEAD.size + hlen] = body
    if tensors:
        base = ctypes.addressof(ctypes.c_char.from_buffer(raw)) + data_start
        for off, nb, t in tensors:  # where ``_reduce`` put them
            if nb:
                ctypes.memmove(base + off, t.data_ptr(), nb)
    return torch.frombuffer(raw, dtype=torch.uint8), gpu


def total_of(frame: torch.Tensor) -> int:
    """Total message size, read from the first bytes of a received frame."""
    return total_size(frame.numpy())


def total_size(head: Any) -> int:
    """Total message size, read from a buffer holding (at least) a message's first bytes."""
    return int(_HEAD.unpack_from(head)[0])


GpuRecv = Callable[[int, str, tuple[int, ...], str], torch.Tensor]


def decode(buf: Any, copy: bool, gpu: GpuRecv | None = None) -> Any:
    """The message in ``buf`` (the whole message: a uint8 tensor or a bytearray). ``copy``:
    the buffer will be reused, so tensors are copied out of it; otherwise they are views
    into it."""
    raw: memoryview | bytearray = buf.numpy().data if isinstance(buf, torch.Tensor) else buf
    _, hlen = _HEAD.unpack_from(raw)
    _S.raw, _S.base, _S.copy, _S.gpu_recv = raw, _align(_HEAD.size + hlen), copy, gpu
    try:
        return pickle.loads(memoryview(raw)[_HEAD.size: _HEAD.size + hlen])
    finally:
        _S.raw, _S.gpu_recv = None, None
