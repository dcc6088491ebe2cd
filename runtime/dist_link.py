"""Point-to-point messages between ranks over torch.distributed, and dead-peer detection.

``Link`` sends each message (``dist_wire`` frames) with ``dist.send`` under a
per-peer lock, so the parts of one message stay together, and runs one
receiver thread per peer that never blocks on anything but the network: it
hands each message to ``on_message``. Rank 0 exchanges heartbeats with every
rank; a peer whose connection breaks (a killed process: gloo's receive fails
at once) or that stays silent for ``peer_timeout_s`` (a hung process or host) is
reported once through ``on_lost``.

``Credits`` is the sending side of back-pressure across processes: a sender
takes a credit per packet for a bounded inbox in another process and gets it
back when that packet leaves the inbox.
"""
from __future__ import annotations

import queue
import re
import threading
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from mmpipe.runtime.channels import SLICE_S, Stopped
from mmpipe.runtime.dist_wire import FRAME, GpuRecv, decode, encode, total_of

HEARTBEAT_S = 1.0
THREAD_PREFIX = "mmpipe-link-"


class PeerLost(RuntimeError):
    """A message could not reach a rank that died or stopped answering."""


class Link:
    """Messages to and from every other rank (see the module docstring)."""

    def __init__(self, rank: int, world: int, on_message: Callable[[int, Any], None], on_lost: Callable[[int, str, bool], None],
                 peer_timeout_s: float, nccl: tuple[Any, Any] | None = None, nccl_peers: set[int] | None = None) -> None:
        """``nccl``: two NCCL groups, for messages to higher and to lower ranks (one
        direction per group and pair, so a receive waiting on a GPU stream is never queued
        in front of a send the peer waits for); used for GPU tensors to ``nccl_peers``."""
        self.rank, self.world = rank, world
        self.on_message, self.on_lost = on_message, on_lost
        self.peer_timeout_s = peer_timeout_s
        self.nccl, self.nccl_peers = nccl, nccl_peers or set()
        self.peers = [k for k in range(world) if k != rank]
        self.locks = {k: threading.Lock() for k in self.peers}  # held while a message is on the wire
        self.outbox: dict[int, queue.SimpleQueue[Any]] = {k: queue.SimpleQueue() for k in self.peers}
        self.last_seen = {k: time.monotonic() for k in self.peers}
        self.lost: set[int] = set()
        self.closing = threading.Event()
        self.threads: list[threading.Thread] = []
        self.sent = 0  # messages sent (diagnostics)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._heartbeat, name=THREAD_PREFIX + "heartbeat", daemon=True)]
        for k in self.peers:
            self.threads.append(threading.Thread(target=self._receive, args=(k,), name=f"{THREAD_PREFIX}recv{k}", daemon=True))
            self.threads.append(threading.Thread(target=self._send_loop, args=(k,), name=f"{THREAD_PREFIX}send{k}", daemon=True))
        for t in self.threads:
            t.start()

    def close(self) -> None:
        """Stop caring about peers (their disconnects are no longer failures); what is
        queued still goes out."""
        self.closing.set()
        for box in self.outbox.values():
            box.put(None)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until every queued message is on the wire."""
        deadline = time.monotonic() + timeout
        while any(self.busy(k) for k in self.peers if k not in self.lost) and time.monotonic() < deadline:
            time.sleep(0.005)

    # ------------------------------------------------------------ sending
    def _group(self, src: int, dst: int) -> Any:
        assert self.nccl is not None
        return self.nccl[0] if src < dst else self.nccl[1]

    def send(self, peer: int, msg: Any, device: str = "cpu") -> None:
        """Queue ``msg`` for ``peer`` (encoded here, sent by the peer's sender thread in
        order, so the caller never waits for the network). ``device``: where the receiver
        will use the message's tensors (GPU tensors go over NCCL when that is a GPU the
        peer reaches that way)."""
        if peer in self.lost:
            raise PeerLost(f"rank {peer} is gone")
        nccl_to = device if self.nccl is not None and peer in self.nccl_peers and device.startswith("cuda") else None
        self.outbox[peer].put(encode(msg, nccl_to))

    def _send_loop(self, peer: int) -> None:
        """Thread body: one peer's messages, in order. A send to a hung peer may never
        return: the heartbeat watch declares it lost meanwhile."""
        box = self.outbox[peer]
        while True:
            got = box.get()
            if got is None or peer in self.lost:
                return
            buf, gpu = got
            total = buf.numel()
            try:
                with self.locks[peer]:
                    dist.send(buf[: min(total, FRAME)], peer)
                    if total > FRAME:
                        dist.send(buf[FRAME:], peer)
                    for t in gpu:
                        dist.send(t, peer, group=self._group(self.rank, peer))
                    self.sent += 1
            except Exception as exc:
                self._lost(peer, f"sending failed: {_short(exc)}")
                return

    def busy(self, peer: int) -> bool:
        """Messages wait for this peer (a heartbeat adds nothing then)."""
        return self.locks[peer].locked() or not self.outbox[peer].empty()

    def broadcast(self, msg: Any) -> None:
        """To every live peer; peers that are gone are skipped."""
        for k in self.peers:
            if k not in self.lost:
                try:
                    self.send(k, msg)
                except PeerLost:
                    pass

    # ------------------------------------------------------------ receiving
    def _receive(self, peer: int) -> None:
        frame = torch.empty(FRAME, dtype=torch.uint8)
        gpu_recv = self._gpu_receiver(peer) if self.nccl is not None and peer in self.nccl_peers else None
        while not self.closing.is_set():
            try:
                dist.recv(frame, src=peer)
                total = total_of(frame)
                if total <= FRAME:
                    msg = decode(frame[:total], copy=True, gpu=gpu_recv)
                else:
                    full = torch.empty(total, dtype=torch.uint8)
                    full[:FRAME].copy_(frame)
                    dist.recv(full[FRAME:], src=peer)
                    msg = decode(full, copy=False, gpu=gpu_recv)
            except Exception as exc:  # the peer's process is gone (or the group was torn down)
                self._lost(peer, f"its connection broke ({_short(exc)})")
                return
            self.last_seen[peer] = time.monotonic()
            try:
                self.on_message(peer, msg)
            except Stopped:
                return
            except BaseException as exc:  # a bug in handling: report it as this peer's loss, loudly
                self._lost(peer, f"a message from it could not be handled: {type(exc).__name__}: {exc}")
                return

    def _gpu_receiver(self, peer: int) -> GpuRecv:
        def recv(i: int, dtype: str, shape: tuple[int, ...], device: str) -> torch.Tensor:
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            dist.recv(t, src=peer, group=self._group(peer, self.rank))
            return t

        return recv

    def _heartbeat(self) -> None:
        watch = self.peers if self.rank == 0 else [0]
        while not self.closing.wait(HEARTBEAT_S):
            for k in watch:
                if k in self.lost:
                    continue
                if time.monotonic() - self.last_seen[k] > self.peer_timeout_s:
                    self._lost(k, f"it sent nothing for {self.peer_timeout_s:g} s (runtime.peer_timeout_s)", hung=True)
                    continue
                if self.busy(k):
                    continue  # messages are going out anyway
                try:
                    self.send(k, ("hb",))
                except PeerLost:
                    continue

    def _lost(self, peer: int, why: str, hung: bool = False) -> None:
        if peer in self.lost or self.closing.is_set():
            return
        self.lost.add(peer)
        self.on_lost(peer, why, hung)


def _short(exc: BaseException) -> str:
    """gloo's first sentence, without its source location: 'Connection closed by peer [127.0.0.1]:37289'."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    return text.split(". ")[0].rstrip(".")


class Credits:
    """Sending-side slots for one bounded inbox in another process."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.cond = threading.Condition()

    def acquire(self, stopped: Callable[[], bool]) -> None:
        with self.cond:
            while self.n <= 0:
                if stopped():
                    raise Stopped()
                self.cond.wait(SLICE_S)
            self.n -= 1

    def release(self, n: int = 1) -> None:
        with self.cond:
            self.n += n
            self.cond.notify_all()
