"""Unix-domain sockets between the ranks of one host (``runtime.transport=auto``).

gloo's point-to-point path is heavy for a pipeline's many small messages: a
receive is a handshake with the sender, and gloo's own I/O thread wakes for
every message. On a 2-core host, two processes passing a 4 KB message per 2.4 ms
compute step ran at 3.6 ms per step over gloo and at 2.5 ms over a stream socket
(``benchmarks/distributed.py``'s hop table measures mmpipe's own). So ranks that
share a kernel and a network namespace (hence the abstract socket namespace)
exchange the link's messages over one stream socket per pair: the sender writes
a message in one ``sendall``; the receiving thread's ``Reader`` takes whatever
has arrived in one receive (usually the whole message, often the next ones
too) and reads the rest of a long one straight into the buffer its tensors
will view. Everything else (the
launch, rendezvous, collectives at start-up, NCCL between GPUs, and messages to
other hosts) stays on torch.distributed.
"""
from __future__ import annotations

import os
import secrets
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmpipe.runtime.dist_wire import FRAME, HEAD_BYTES, total_size

_RANK = struct.Struct("<I")
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)  # Linux, the only place these sockets are used


def host_key() -> str | None:
    """What two processes must share to reach each other's abstract Unix sockets: the
    kernel (its boot id) and the network namespace. None where that is not Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None
    return f"{socket.gethostname()}/{boot}/{netns}"


def open_local(rank: int, world: int, enabled: bool) -> dict[int, socket.socket]:
    """Collective: a connected stream socket to every other rank of this host (by rank).

    Every rank listens first, then all learn each other's address (one
    ``all_gather_object``), then each connects to the lower ranks of its host and
    accepts the higher ones (a connect completes against the listen backlog, so
    the order cannot deadlock). Both ends of a pair decide from the same gathered
    keys, so they agree on which pairs use a socket."""
    key, name, listener = (host_key() if enabled else None), "", None
    if key is not None:
        try:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            name = f"\0mmpipe-{os.getpid()}-{secrets.token_hex(8)}"  # abstract: no file to clean up
            listener.bind(name)
            listener.listen(world)
        except OSError:
            key, listener = None, None
    every: list[Any] = [None] * world
    dist.all_gather_object(every, (key, name))
    peers = [k for k, (kk, _) in enumerate(every) if k != rank and key is not None and kk == key]
    socks: dict[int, socket.socket] = {}
    try:
        for k in peers:
            if k < rank:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(every[k][1])
                s.sendall(_RANK.pack(rank), _NOSIGNAL)
                socks[k] = s
        for _ in [k for k in peers if k > rank]:
            assert listener is not None
            s, _addr = listener.accept()
            head = bytearray(_RANK.size)
            recv_exact(s, memoryview(head))
            socks[_RANK.unpack(head)[0]] = s
    finally:
        if listener is not None:
            listener.close()
    return socks


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; ``ConnectionError`` when the peer closed it."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("connection closed by peer")
        got += k


class Reader:
    """Whole messages (``dist_wire`` layout) from one socket, each in a fresh bytearray.

    One ``recv`` usually brings a small message whole (and often the next ones), so a
    receiver makes one system call per message or fewer; a longer one's rest is read
    straight into its own buffer, which its tensors then view (no copy)."""

    def __init__(self, sock: socket.socket, size: int = FRAME) -> None:
        self.sock = sock
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.lo = self.hi = 0  # the bytes received and not yet handed out

    def read(self) -> bytearray:
        if self.hi - self.lo < HEAD_BYTES:
            self._fill(HEAD_BYTES)
        total = total_size(self.view[self.lo: self.lo + HEAD_BYTES])
        have = self.hi - self.lo
        if total <= have:
            out = self.buf[self.lo: self.lo + total]
            self.lo += total
            return out
        out = bytearray(total)
        out[:have] = self.view[self.lo: self.hi]
        self.lo = self.hi = 0
        if total - have <= len(self.buf) // 2:  # the rest is small: it may bring the next message too
            self._fill(total - have)
            out[have:] = self.view[: total - have]
            self.lo = total - have
        else:
            recv_exact(self.sock, memoryview(out)[have:])
        return out

    def _fill(self, need: int) -> None:
        """Receive until ``need`` bytes are held (moving what is held to the front first)."""
        if self.lo:
            held = self.hi - self.lo
            self.buf[:held] = self.view[self.lo: self.hi]
            self.lo, self.hi = 0, held
        while self.hi < need:
            k = self.sock.recv_into(self.view[self.hi:])
            if k == 0:
                raise ConnectionError("connection closed by peer")
            self.hi += k


def write_message(sock: socket.socket, buf: torch.Tensor) -> None:
    """Send one encoded message (blocks only while the peer's socket buffer is full). A peer
    that is gone is an ``OSError`` here, never a SIGPIPE (the CLI restores SIGPIPE's default,
    which would end this process without a word)."""
    sock.sendall(buf.numpy().data, _NOSIGNAL)
