"""The listening socket ``mmpipe serve`` makes itself (so ``--port 0`` can report its port)."""
from __future__ import annotations

import asyncio
import socket

from mmpipe.serve import _bind


def test_served_connections_send_without_nagle() -> None:
    """asyncio disables Nagle only on sockets it knows are TCP; with Nagle on, a response's
    body waited for the client's delayed ACK of the headers (~40 ms per request)."""
    sock = _bind("127.0.0.1", 0)
    nodelay: list[int] = []

    async def main() -> None:
        accepted = asyncio.Event()

        class Proto(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                nodelay.append(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                accepted.set()

        server = await asyncio.get_running_loop().create_server(Proto, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
            await asyncio.wait_for(accepted.wait(), 10)
            writer.close()

    asyncio.run(main())
    assert nodelay and nodelay[0] != 0
