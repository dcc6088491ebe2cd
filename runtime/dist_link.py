"""Point-to-point messages between ranks, and dead-peer detection.

``Link`` posts each message (``dist_wire`` frames) under a per-peer lock, so the
parts of one message stay together and messages keep their order: with
``dist.isend`` over gloo, or with one write on a Unix socket to a rank of the
same host (``dist_local``). A stage worker posts its own messages (no hand-off to another
thread on the latency path; posting waits for the peer only while a socket's buffer
is full, and the peer's receiver thread always drains it) and a sender
thread per peer waits for their completion; messages from the receiver
threads and the heartbeat, and those with NCCL parts, are posted by that sender
thread (a receiver thread must never wait on a peer whose receiver may be waiting
on it, and the heartbeat must keep watching while a hung peer's socket is full).
One receiver thread per peer never blocks on anything but the network:
it hands each message to ``on_message``. Rank 0 exchanges heartbeats with every
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
import socket
import threading
import time
from collections import deque
from typing import Any, Callable

import torch
import torch.distributed as dist

from mmpipe.runtime.channels import SLICE_S, Stopped
from mmpipe.runtime.dist_local import Reader, write_message
from mmpipe.runtime.dist_wire import FRAME, GpuRecv, decode, encode, total_of

HEARTBEAT_S = 1.0
REAP_S = 0.005  # how often a sender thread collects the completions of posted messages ...
PARK_AFTER = 20  # ... until this many rounds passed with nothing to collect (then it sleeps)
THREAD_PREFIX = "mmpipe-link-"


class PeerLost(RuntimeError):
    """A message could not reach a rank that died or stopped answering."""


class Link:
    """Messages to and from every other rank (see the module docstring)."""

    def __init__(self, rank: int, world: int, on_message: Callable[[int, Any], None], on_lost: Callable[[int, str, bool], None],
                 peer_timeout_s: float, nccl: tuple[Any, Any] | None = None, nccl_peers: set[int] | None = None,
                 local: dict[int, socket.socket] | None = None) -> None:
        """``nccl``: two NCCL groups, for messages to higher and to lower ranks (one
        direction per group and pair, so a receive waiting on a GPU stream is never queued
        in front of a send the peer waits for); used for GPU tensors to ``nccl_peers``.
        ``local``: a connected socket per rank of this host (``dist_local.open_local``);
        messages to those ranks go through it instead of gloo."""
        self.rank, self.world = rank, world
        self.on_message, self.on_lost = on_message, on_lost
        self.peer_timeout_s = peer_timeout_s
        self.nccl, self.nccl_peers = nccl, nccl_peers or set()
        self.local = local or {}
        self.peers = [k for k in range(world) if k != rank]
        self.locks = {k: threading.Lock() for k in self.peers}  # held while a message is posted (keeps the order)
        # per peer: (buf, gpu) for the sender thread to post, () to wake it up
        self.outbox: dict[int, queue.SimpleQueue[Any]] = {k: queue.SimpleQueue() for k in self.peers}
        # per peer, in order: (works, buf) of messages posted by workers (buffers live until sent)
        self.posted: dict[int, deque[tuple[list[Any], torch.Tensor]]] = {k: deque() for k in self.peers}
        self.parked = {k: False for k in self.peers}  # the peer's sender thread sleeps until woken
        self.unposted = {k: 0 for k in self.peers}  # "post" entries not yet posted (under the lock)
        self.queued = {k: 0 for k in self.peers}  # messages sent (under the lock) ...
        self.done = {k: 0 for k in self.peers}  # ... and finished (under the lock)
        # threads whose messages the sender threads post (receivers, the heartbeat): they must
        # never wait on a peer (a full socket to a hung peer would stop the watch itself)
        self.queuers: set[int] = set()
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
        """Send ``msg`` to ``peer``, in order, without waiting for the peer to take it (a
        socket write waits only while the socket's buffer is full). ``device``:
        where the receiver will use the message's tensors (GPU tensors go over NCCL when
        that is a GPU the peer reaches that way)."""
        if peer in self.lost:
            raise PeerLost(f"rank {peer} is gone")
        nccl_to = device if self.nccl is not None and peer in self.nccl_peers and device.startswith("cuda") else None
        buf, gpu = encode(msg, nccl_to)
        inline = not gpu and threading.get_ident() not in self.queuers
        with self.locks[peer]:
            self.queued[peer] += 1
            if inline and not self.unposted[peer]:  # nothing queued ahead of it: post it here
                try:
                    works = self._post(peer, buf)
                except Exception as exc:
                    self._lost(peer, f"sending failed: {_short(exc)}")
                    raise PeerLost(f"rank {peer}: {exc}") from exc
                if not works:  # written to a socket: finished already
                    self.done[peer] += 1
                    return
                self.posted[peer].append((works, buf))
                if self.parked[peer]:
                    self.outbox[peer].put(())
                return
            self.unposted[peer] += 1
            self.outbox[peer].put((buf, gpu))

    def _post(self, peer: int, buf: torch.Tensor) -> list[Any]:
        """Post one message's parts (the caller holds the peer's lock); the works to wait
        for (none when it went into a local socket)."""
        self.sent += 1
        if peer in self.local:
            write_message(self.local[peer], buf)
            return []
        total = buf.numel()
        works = [dist.isend(buf[: min(total, FRAME)], peer)]
        if total > FRAME:
            works.append(dist.isend(buf[FRAME:], peer))
        return works

    def _send_loop(self, peer: int) -> None:
        """Thread body: post the queued messages of one peer, and collect the completions
        of every message to it (every ``REAP_S`` while messages flow, so a stream of
        messages costs no wake-up each). A send to a hung peer may never complete: the
        heartbeat watch declares it lost meanwhile."""
        box, idle = self.outbox[peer], 0
        while True:
            if idle >= PARK_AFTER:
                self.parked[peer] = True  # then look once more (a poster reads the flag after appending)
                got = box.get() if not self.posted[peer] else ()
                self.parked[peer] = False
            else:
                try:
                    got = box.get(timeout=REAP_S)
                except queue.Empty:
                    got = ()
            try:
                reaped = self._reap(peer)
                if got is None or peer in self.lost:
                    return
                idle = 0 if got or reaped else idle + 1
                if got:
                    buf, gpu = got
                    with self.locks[peer]:
                        self.unposted[peer] -= 1
                        works = self._post(peer, buf)
                        if gpu:  # NCCL parts follow their message's frames
                            for w in works:
                                w.wait()
                            for t in gpu:
                                dist.send(t, peer, group=self._group(self.rank, peer))
                    for w in works:
                        w.wait()
                    with self.locks[peer]:
                        self.done[peer] += 1
            except Exception as exc:
                self._lost(peer, f"sending failed: {_short(exc)}")
                return

    def _reap(self, peer: int) -> int:
        """Wait for the messages workers posted to ``peer``, oldest first; how many."""
        dq, n = self.posted[peer], 0
        while dq:
            for w in dq[0][0]:
                w.wait()
            dq.popleft()
            with self.locks[peer]:
                self.done[peer] += 1
            n += 1
        return n

    def busy(self, peer: int) -> bool:
        """Messages wait for this peer (a heartbeat adds nothing then)."""
        return self.done[peer] < self.queued[peer]

    def broadcast(self, msg: Any) -> None:
        """To every live peer; peers that are gone are skipped."""
        for k in self.peers:
            if k not in self.lost:
                try:
                    self.send(k, msg)
                except PeerLost:
                    pass

    # ------------------------------------------------------------ receiving
    def transport(self, peer: int) -> str:
        """How messages reach ``peer``: ``unix`` (a local socket) or ``gloo``, ``+nccl``
        when GPU tensors go over NCCL."""
        return ("unix" if peer in self.local else "gloo") + ("+nccl" if self.nccl is not None and peer in self.nccl_peers else "")

    def _receive(self, peer: int) -> None:
        self.queuers.add(threading.get_ident())  # before the first message: its replies are queued
        frame = torch.empty(FRAME, dtype=torch.uint8)
        gpu_recv = self._gpu_receiver(peer) if self.nccl is not None and peer in self.nccl_peers else None
        sock = self.local.get(peer)
        reader = Reader(sock) if sock is not None else None
        while not self.closing.is_set():
            try:
                if reader is not None:
                    msg = decode(reader.read(), copy=False, gpu=gpu_recv)
                else:
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
        self.queuers.add(threading.get_ident())
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
