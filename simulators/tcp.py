"""A bus behind a TCP socket, the way a transparent serial server (透传) exposes an RS-485 line.

Several clients may connect; they all share the one bus (and its timing).
"""

from __future__ import annotations

import asyncio
import logging

from simulators.bus import Bus, Connection, StreamPort

log = logging.getLogger(__name__)


class _SocketPort(StreamPort):
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.transport: asyncio.Transport | None = None
        self.conn: Connection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn = self.bus.attach(self)
        self.bus.truth["connections"] += 1

    def data_received(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class TcpExposure:
    kind = "tcp"

    def __init__(self, server: asyncio.Server) -> None:
        self.server = server
        host, port = server.sockets[0].getsockname()[:2]
        self.host, self.port = host, port
        self.where = f"{host}:{port}"

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def serve_tcp(bus: Bus, host: str, port: int) -> TcpExposure:
    """Listen for clients of this bus (port 0 = any free port; `.port` tells which)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _SocketPort(bus), host, port)
    return TcpExposure(server)
