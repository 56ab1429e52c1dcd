"""Byte-stream links over one asyncio transport at a time, and the TCP client link.

`ByteLink` is shared with the serial link: `_open()` connects, the session
reports up, and the transport's `connection_lost` takes the link down at
once (waking a reader) before `run` reconnects. `TcpLink` dials a
transparent serial server (透传, e.g. USR-TCP232, ZLAN). TCP keepalive is
switched on so that a peer that vanished without a FIN (power cut,
cellular loss) is noticed even while the bus is idle. `render` and
`strip_heartbeats` are the DTU packet helpers the listener uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from typing import Any, ClassVar

from gateway.links.base import RECONNECT_MAX, RECONNECT_MIN, Link, LinkDown, describe

CLOSE_WAIT = 2.0  # s to wait until a transport is really closed (a serial port, before it is opened again)
KEEPALIVE_IDLE = 30  # s of silence before the first probe
KEEPALIVE_INTERVAL = 10  # s between probes
KEEPALIVE_COUNT = 3  # unanswered probes before the connection counts as dead

Matcher = bytes | re.Pattern[bytes]  # a DTU packet pattern: exact bytes or a regex


def render(raw: bytes) -> str:
    """An identity as written in config: printable ASCII as text, anything else as upper-case hex."""
    if raw and all(0x20 <= b < 0x7F for b in raw):
        return raw.decode("ascii")
    return raw.hex().upper()


def strip_heartbeats(data: bytes, heartbeat: Matcher) -> tuple[bytes, int]:
    """Remove heartbeats at the start (exact bytes: also at the end) of a packet; the rest and how many."""
    count = 0
    if isinstance(heartbeat, bytes):
        while data.startswith(heartbeat):
            data, count = data[len(heartbeat):], count + 1
        while data.endswith(heartbeat):
            data, count = data[: -len(heartbeat)], count + 1
        return data, count
    while data:
        found = heartbeat.match(data)
        if found is None or found.end() == 0:
            break
        data, count = data[found.end():], count + 1
    return data, count


def enable_keepalive(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                          ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class StreamProtocol(asyncio.Protocol):
    """Feeds a byte link from its transport and reports when the transport is lost."""

    def __init__(self, link: ByteLink) -> None:
        self.link: ByteLink | None = link
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if self.link is not None:
            self.link._feed(data)

    def eof_received(self) -> bool:
        return False  # close: a half-open link is no use

    def connection_lost(self, exc: Exception | None) -> None:
        reason = "closed by the other side"
        if exc is not None:
            reason = self.link.describe_loss(exc) if self.link is not None else describe(exc)
        if self.link is not None:
            self.link._set_down(reason)
        if not self.lost.done():
            self.lost.set_result(reason)


class ByteLink(Link):
    """A link over one asyncio transport at a time (serial port, TCP socket)."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self._transport: asyncio.Transport | None = None

    async def run(self, stop: asyncio.Event) -> None:
        await self._keep_connected(stop, self._session)

    async def _open(self) -> tuple[asyncio.Transport, StreamProtocol, str]:
        """Connect: the transport, its protocol and where it is connected (for `detail`)."""
        raise NotImplementedError

    def _close(self, transport: asyncio.Transport) -> None:
        transport.close()

    def describe_loss(self, exc: BaseException) -> str:
        """Why the transport was lost, for `detail` and the log."""
        return describe(exc)

    async def _session(self) -> str:
        transport, protocol, where = await self._open()
        self._transport = transport
        try:
            self._set_up(where)
            return await asyncio.shield(protocol.lost)
        finally:
            self._transport = None
            protocol.link = None  # closing on purpose is not a drop
            if not transport.is_closing():
                self._close(transport)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(protocol.lost), CLOSE_WAIT)

    sync_send: ClassVar[bool] = True

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise LinkDown(f"{self.name}: {self.detail}")
        transport.write(data)


class TcpLink(ByteLink):
    kind: ClassVar[str] = "tcp"

    def __init__(self, name: str, host: str, port: int, connect_timeout: float = 5.0, *,
                 reconnect_min: float = RECONNECT_MIN, reconnect_max: float = RECONNECT_MAX) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"port must be 1..65535, got {port}")
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be > 0, got {connect_timeout}")
        super().__init__(name, reconnect_min=reconnect_min, reconnect_max=reconnect_max)
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout

    async def _open(self) -> tuple[asyncio.Transport, StreamProtocol, str]:
        loop = asyncio.get_running_loop()
        protocol = StreamProtocol(self)
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, _ = await loop.create_connection(lambda: protocol, self.host, self.port)
        except TimeoutError as exc:
            raise TimeoutError(f"no answer from {self.host}:{self.port} within {self.connect_timeout:g} s") from exc
        enable_keepalive(transport)
        peer = transport.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else f"{self.host}:{self.port}"
        return transport, protocol, where
