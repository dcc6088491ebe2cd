"""The wire format between ranks: any message survives encode/decode, tensors travel as raw
bytes (aligned, viewed or copied out), and a socket ``Reader`` hands out whole messages in
order however the bytes arrive."""
from __future__ import annotations

import random
import socket
import threading
from typing import Any

import pytest
import torch

from mmpipe.graphs.base import ItemMeta
from mmpipe.runtime.dist_local import Reader, write_message
from mmpipe.runtime.dist_wire import ALIGN, HEAD_BYTES, decode, encode, total_of


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(4, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "i64": torch.arange(7),
        "bool": torch.tensor([True, False, True]),
        "u8": torch.arange(5, dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "transposed": base.t(),  # not contiguous
        "slice": base[2:4, 1:],  # a view with an offset into its storage
        "grad": torch.ones(2, 2, requires_grad=True),
        "param": torch.nn.Parameter(torch.full((3,), 4.0)),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.detach(), b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _message() -> tuple[Any, ...]:
    ts = _tensors()
    return ("put", (1, 0), [ItemMeta("r1", 0, 1, {"seed": 7}), ItemMeta("r2", 1, 3)],
            {"values": ts, "nested": [ts["f32"], (ts["i64"], {"deep": ts["slice"]})], "text": "hi", "none": None},
            {"r1": {0: 0.25}})


@pytest.mark.parametrize("as_tensor", [False, True], ids=["bytearray, views", "uint8 tensor, copies"])
def test_any_message_comes_back_equal(as_tensor: bool) -> None:
    msg = _message()
    buf, gpu = encode(msg)
    assert gpu == [] and buf.dtype == torch.uint8 and total_of(buf) == buf.numel()
    src: Any = buf.clone() if as_tensor else bytearray(buf.numpy().tobytes())
    got = decode(src, copy=as_tensor)
    assert _same(got, msg)
    assert isinstance(got[2][0], ItemMeta) and got[2][0].params == {"seed": 7}


def test_tensors_are_aligned_views_or_independent_copies() -> None:
    x = torch.arange(10, dtype=torch.float32)
    raw = bytearray(encode(("m", x, torch.arange(3)))[0].numpy().tobytes())
    _, viewed, small = decode(raw, copy=False)
    base = torch.frombuffer(raw, dtype=torch.uint8).data_ptr()
    assert (viewed.data_ptr() - base) % ALIGN == 0 and (small.data_ptr() - base) % ALIGN == 0
    raw[viewed.data_ptr() - base] ^= 0xFF  # the view sees the buffer change
    assert not torch.equal(viewed, x)

    frame = encode(("m", x))[0]
    _, copied = decode(frame, copy=True)
    frame.fill_(0)  # a reused receive buffer: the copy keeps its values
    assert torch.equal(copied, x)


def test_a_message_without_tensors_is_only_its_header() -> None:
    buf, _ = encode(("hb",))
    assert buf.numel() <= HEAD_BYTES + 64 and decode(buf, copy=True) == ("hb",)


class _Pieces:
    """A socket stand-in whose receives return the stream in pieces of chosen sizes (so a
    read can end anywhere: inside a header, inside a tensor, between messages)."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data, self.pos, self.sizes, self.calls = data, 0, sizes, 0

    def recv_into(self, view: memoryview) -> int:
        k = min(len(view), self.sizes[self.calls % len(self.sizes)], len(self.data) - self.pos)
        view[:k] = self.data[self.pos: self.pos + k]
        self.pos += k
        self.calls += 1
        return k  # 0 at the end: the peer closed


def _stream(seed: int) -> tuple[list[Any], bytes]:
    rng = random.Random(seed)
    msgs = []
    for i in range(80):  # sizes around and far beyond the reader's buffer
        n = rng.choice([0, 1, 30, 100, 700, 1500, 5000, 70_000])
        msgs.append(("m", i, torch.arange(n, dtype=torch.float32), "x" * rng.randrange(200)))
    return msgs, b"".join(encode(m)[0].numpy().tobytes() for m in msgs)


@pytest.mark.parametrize("sizes", [[1], [5, 11], [HEAD_BYTES - 3, 40, 7], [3000, 13, 9000], [1 << 20]],
                         ids=["byte by byte", "small", "headers split", "mixed", "all at once"])
def test_the_reader_hands_out_whole_messages_however_the_bytes_arrive(sizes: list[int]) -> None:
    msgs, data = _stream(len(sizes))
    sock = _Pieces(data, sizes)
    reader = Reader(sock, size=4096)  # type: ignore[arg-type]  # small: messages straddle refills and outgrow it
    got = [decode(reader.read(), copy=False) for _ in msgs]
    assert all(_same(g, m) for g, m in zip(got, msgs))
    assert sock.pos == len(data)
    with pytest.raises(ConnectionError):  # and then the peer is gone
        reader.read()
    if sizes == [1 << 20]:  # whole receives: several small messages per system call
        assert sock.calls < len(msgs)


def test_the_reader_over_a_real_socket() -> None:
    msgs, data = _stream(9)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    t = threading.Thread(target=lambda: (a.sendall(data), a.close()))
    t.start()
    try:
        reader = Reader(b)
        got = [decode(reader.read(), copy=False) for _ in msgs]
    finally:
        b.close()  # a failed read must not leave the sender blocked
        t.join(10)
    assert all(_same(g, m) for g, m in zip(got, msgs))


def test_write_message_sends_what_encode_made() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    msg = _message()
    write_message(a, encode(msg)[0])
    assert _same(decode(Reader(b).read(), copy=False), msg)
