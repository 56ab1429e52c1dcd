"""A 4G DTU (透传 DTU in TCP-client mode): it dials the gateway and carries one bus over the socket.

Like the devices in concentrators.md §4: a registration packet right after
connecting ("once"), in front of every data packet ("prefix") or both; a
heartbeat packet every `heartbeat_s` while connected; redial with capped
exponential backoff and jitter whenever the connection goes away (the gateway
closed it, the network failed, or the `link_drop` fault aborted it).

A DTU does not forward serial bytes one by one: it packs them (打包) and sends
a packet when the serial line goes quiet. `Packer` does the same with the
timed chunks a bus writes: one packet per complete reply frame, and whatever
is left (a corrupt or truncated reply, garbage) after a quiet time. The MQTT
exposure packs the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from simulators.bus import Bus, Connection, StreamPort
from simulators.packing import Backoff, Packer

log = logging.getLogger(__name__)

REGISTER_MODES = ("once", "prefix", "both")
CONNECT_TIMEOUT = 10.0  # s before a dial attempt counts as failed


class _DtuSession(StreamPort):
    """One TCP connection of the DTU; the bus's Port while it lasts."""

    def __init__(self, dtu: DtuExposure) -> None:
        self.dtu = dtu
        self.transport: asyncio.Transport | None = None
        self.conn: Connection | None = None
        self.packer = Packer(dtu.bus, self._send_packet)
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        dtu = self.dtu
        if dtu.registration and dtu.register_mode in ("once", "both"):
            transport.write(dtu.registration)
            dtu.bus.truth["dtu_registrations"] += 1
        self.conn = dtu.bus.attach(self)

    def data_received(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.packer.close()
        if not self.lost.done():
            self.lost.set_result(None)

    def send_raw(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _send_packet(self, data: bytes) -> None:
        prefix = self.dtu.registration if self.dtu.register_mode in ("prefix", "both") else b""
        self.send_raw(prefix + data)

    def write(self, data: bytes) -> None:  # Port: the bus's chunks are packed into packets first
        if self.transport is not None and not self.transport.is_closing():
            self.packer.write(data)


class DtuExposure:
    kind = "dtu"

    def __init__(self, bus: Bus, host: str, port: int, *, registration: bytes, register_mode: str,
                 heartbeat: bytes, heartbeat_s: float, reconnect_min: float, reconnect_max: float) -> None:
        if register_mode not in REGISTER_MODES:
            raise ValueError(f"register_mode must be one of {', '.join(REGISTER_MODES)}, got {register_mode!r}")
        if heartbeat and heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be > 0, got {heartbeat_s}")
        self.bus = bus
        self.host, self.port = host, port
        self.where = f"dtu -> {host}:{port}"
        self.registration = registration
        self.register_mode = register_mode
        self.heartbeat = heartbeat
        self.heartbeat_s = heartbeat_s
        self.backoff = Backoff(reconnect_min, reconnect_max)
        self.connected = asyncio.Event()  # set while a connection is up
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"dtu-{bus.name}")

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        truth = self.bus.truth
        while True:
            try:
                _, session = await asyncio.wait_for(
                    loop.create_connection(lambda: _DtuSession(self), self.host, self.port), CONNECT_TIMEOUT)
            except OSError as exc:  # TimeoutError included
                truth["dtu_connect_failures"] += 1
                delay = self.backoff.next()
                log.debug("%s: dial failed (%s); next try in %.2f s", self.where, exc, delay)
                await asyncio.sleep(delay)
                continue
            truth["dtu_connects"] += 1
            since = loop.time()
            await self._connected(session)
            truth["dtu_disconnects"] += 1
            if loop.time() - since >= self.backoff.cap:  # a connection that lived: start over at the minimum
                self.backoff.reset()
            delay = self.backoff.next()
            log.info("%s: connection lost; redialling in %.2f s", self.where, delay)
            await asyncio.sleep(delay)

    async def _connected(self, session: _DtuSession) -> None:
        self.connected.set()
        beats = asyncio.get_running_loop().create_task(self._heartbeats(session)) if self.heartbeat else None
        try:
            await asyncio.shield(session.lost)  # a cancelled wait must not cancel the future
        finally:
            self.connected.clear()
            if beats is not None:
                beats.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beats
            if not session.lost.done() and session.transport is not None:  # we are being closed
                session.transport.close()

    async def _heartbeats(self, session: _DtuSession) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await session.packer.idle.wait()  # never inside a reply packet
            session.send_raw(self.heartbeat)
            self.bus.truth["dtu_heartbeats"] += 1


async def dial_dtu(bus: Bus, host: str, port: int, *, registration: bytes = b"", register_mode: str = "once",
                   heartbeat: bytes = b"", heartbeat_s: float = 60.0, reconnect_min: float = 1.0,
                   reconnect_max: float = 30.0) -> DtuExposure:
    """Dial the gateway at host:port as a DTU and keep dialling until closed.

    `register_mode`: "once" (registration right after connecting), "prefix"
    (in front of every reply packet) or "both". An empty `heartbeat` sends
    none. Counts `dtu_connects`, `dtu_disconnects`, `dtu_connect_failures`,
    `dtu_registrations` and `dtu_heartbeats` in `bus.truth`. Returns at once;
    `.connected` tells whether a connection is up.
    """
    return DtuExposure(bus, host, port, registration=registration, register_mode=register_mode,
                       heartbeat=heartbeat, heartbeat_s=heartbeat_s, reconnect_min=reconnect_min,
                       reconnect_max=reconnect_max)
