"""Unix sockets between ranks of one host: the wire format through a socket, and the
collective that pairs ranks up (two real processes on a gloo group)."""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from mmpipe.graphs.base import ItemMeta
from mmpipe.runtime.dist_local import Reader, host_key, open_local, write_message
from mmpipe.runtime.dist_wire import decode, encode

ROOT = Path(__file__).resolve().parents[3]


def test_messages_cross_a_socket_whole_and_in_order() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    big = torch.arange(300_000, dtype=torch.float32).reshape(600, 500)  # more than a socket buffer holds
    msgs = [("put", (1, 0), {"h": big, "ids": torch.tensor([3, 4])}, [ItemMeta("r1", 0, 1, {"seed": 7})]),
            ("hb",), ("collect", {"text": "hi", "empty": torch.empty(0, 3)}, [1.5, None])]
    got: list[Any] = []
    rb = Reader(b)
    reader = threading.Thread(target=lambda: got.extend(decode(rb.read(), copy=False) for _ in msgs))
    reader.start()
    for m in msgs:
        write_message(a, encode(m)[0])
    reader.join(10)
    assert got[0][:2] == ("put", (1, 0)) and got[0][3] == msgs[0][3]
    assert torch.equal(got[0][2]["h"], big) and torch.equal(got[0][2]["ids"], torch.tensor([3, 4]))
    assert got[1] == ("hb",)
    assert got[2][1]["text"] == "hi" and got[2][1]["empty"].shape == (0, 3) and got[2][2] == [1.5, None]


def test_a_closed_peer_is_a_connection_error() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    write_message(a, encode(("hb",))[0][:10])  # half a header, then the peer is gone
    a.close()
    with pytest.raises(ConnectionError):
        Reader(b).read()


def test_a_gone_peer_is_an_error_not_a_sigpipe() -> None:
    # the CLI restores SIGPIPE's default action: a plain write to a closed socket would end
    # the process without a word (a driver then loses its summary after Ctrl-C)
    code = ("import signal, socket\n"
            "from mmpipe.runtime.dist_local import write_message\n"
            "from mmpipe.runtime.dist_wire import encode\n"
            "signal.signal(signal.SIGPIPE, signal.SIG_DFL)\n"
            "a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            "b.close()\n"
            "try:\n"
            "    write_message(a, encode(('hb',))[0])\n"
            "except OSError as exc:\n"
            "    print('error', type(exc).__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (r.returncode, r.stdout.strip()) == (0, "error BrokenPipeError"), r.stderr


def test_host_key_names_this_kernel_and_network_namespace() -> None:
    key = host_key()
    assert key is not None and key == host_key()
    assert key.startswith(socket.gethostname() + "/")


def _rank(rank: int, world: int, store: str, enabled: list[bool], out: Any) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    socks = open_local(rank, world, enabled[rank])
    for k, s in socks.items():  # each pair: the lower rank says hello first
        if k > rank:
            write_message(s, encode(("hello", rank))[0])
    heard = {k: decode(Reader(s).read(), copy=False) for k, s in socks.items() if k < rank}
    for k, s in socks.items():
        if k < rank:
            write_message(s, encode(("back", rank))[0])
    back = {k: decode(Reader(s).read(), copy=False) for k, s in socks.items() if k > rank}
    out.put((rank, sorted(socks), heard, back))
    dist.destroy_process_group()


def _run(tmp_path: Path, enabled: list[bool]) -> dict[int, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(k, len(enabled), str(tmp_path / "store"), enabled, out)) for k in range(len(enabled))]
    for p in procs:
        p.start()
    got = {}
    for _ in procs:
        rank, *rest = out.get(timeout=60)
        got[rank] = rest
    for p in procs:
        p.join(30)
    return got


def test_every_pair_of_ranks_on_one_host_gets_a_socket(tmp_path: Path) -> None:
    got = _run(tmp_path, [True, True, True])
    assert got[0] == [[1, 2], {}, {1: ("back", 1), 2: ("back", 2)}]
    assert got[1] == [[0, 2], {0: ("hello", 0)}, {2: ("back", 2)}]
    assert got[2] == [[0, 1], {0: ("hello", 0), 1: ("hello", 1)}, {}]


def test_a_rank_without_sockets_pairs_with_nobody(tmp_path: Path) -> None:
    # both ends decide from the same gathered keys: rank 1's peers agree it has no socket
    got = _run(tmp_path, [True, False, True])
    assert [got[k][0] for k in range(3)] == [[2], [], [0]]


def test_a_hung_peer_with_a_full_socket_is_still_found(monkeypatch: pytest.MonkeyPatch) -> None:
    # The peer stops reading (a hung process): its socket fills up. The heartbeat must not
    # wait on that socket itself, or nothing would ever notice the peer went silent.
    from mmpipe.runtime import dist_link

    monkeypatch.setattr(dist_link, "HEARTBEAT_S", 0.05)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    try:
        while True:
            a.send(b"\0" * 65536)
    except BlockingIOError:
        pass  # full
    a.setblocking(True)
    lost: list[tuple[int, str, bool]] = []
    link = dist_link.Link(0, 2, lambda src, msg: None, lambda k, why, hung: lost.append((k, why, hung)), peer_timeout_s=0.5, local={1: a})
    link.start()
    deadline = time.monotonic() + 10
    while not lost and time.monotonic() < deadline:
        time.sleep(0.02)
    link.close()
    b.close()  # the blocked writes fail; the link's threads end
    for t in link.threads:
        t.join(5)
    assert lost and lost[0][0] == 1 and lost[0][2] is True, lost
    assert "sent nothing for 0.5 s" in lost[0][1]
