"""An emulated RS-485 line: many meters, one half-duplex wire, real byte timing, injected faults.

Transports (pty, serial port, TCP server, DTU, MQTT) attach `Port`s and feed
the bytes they receive; one task per bus serves requests in order, like the
wire does. Timing: a byte takes 11 bits at the bus's baud (8E1); a meter
answers after its reply delay; the reply goes out in chunks at the moments
their last byte would have crossed the wire, so a client sees the first
bytes early and the last byte at the right time. `baud = 0` turns the wire
emulation off (instant answers, for load tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from protocols.dlt645 import BROADCAST, Accept, Frame, Framer
from simulators.faults import FaultPlan, FaultRule
from simulators.meter import Meter

log = logging.getLogger(__name__)
CHUNK = 16  # bytes per write while a reply is "on the wire"


class Port(Protocol):
    """Where a bus's bytes go: one client connection, a pty or a serial port."""

    def write(self, data: bytes) -> None: ...

    def drop(self) -> None:
        """Close the connection or hang up (link-drop fault)."""


class StreamPort(asyncio.Protocol):
    """A `Port` over an asyncio transport (socket, serial port): writes while open, aborts on link drop."""

    transport: asyncio.Transport | None = None

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def drop(self) -> None:
        if self.transport is not None:
            self.transport.abort()


@dataclass
class Wire:
    baud: int = 2400
    delay_min: float = 0.020
    delay_max: float = 0.080
    request_on_wire: bool = True  # the transport delivers a request at once: emulate its transmit time
    gap: float = 0.0  # bus turnaround after a reply

    def byte_time(self) -> float:
        return 11.0 / self.baud if self.baud else 0.0


class Connection:
    """One attached port: its own framer (requests only; our own replies echoed back are dropped)."""

    def __init__(self, bus: Bus, port: Port) -> None:
        self.bus = bus
        self.port = port
        self.framer = Framer(Accept.REQUESTS)
        self.open = True

    def feed(self, data: bytes) -> None:
        now = self.bus.clock()
        for event in self.framer.feed(data):
            if isinstance(event, Frame):
                self.bus.submit(self, event, now)
            else:
                self.bus.truth["bad_requests"] += 1

    def feed_message(self, data: bytes) -> None:
        """One whole message (MQTT): a partial frame left over will never complete, so count and drop it."""
        self.feed(data)
        if self.framer.pending:
            self.framer.reset()
            self.bus.truth["bad_requests"] += 1

    def close(self) -> None:
        self.open = False
        self.bus.detach(self)


class Bus:
    def __init__(self, name: str, meters: Iterable[Meter], wire: Wire | None = None, *,
                 faults: FaultPlan | None = None, seed: int = 0, clock: Callable[[], float] = time.time,
                 preamble: dict[str, int] | None = None) -> None:
        self.name = name
        self.meters: dict[str, Meter] = {m.address: m for m in meters}
        self.wire = wire or Wire()
        self.faults = faults or FaultPlan()
        self.preamble = preamble or {}
        self.clock = clock
        self.rng = random.Random(seed)
        self.truth: Counter[str] = Counter()
        self.connections: list[Connection] = []
        self._queue: asyncio.Queue[tuple[Connection, Frame, float]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._busy_until = 0.0

    # --- attachment ----------------------------------------------------------------------------
    def attach(self, port: Port) -> Connection:
        conn = Connection(self, port)
        self.connections.append(conn)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._serve(), name=f"bus-{self.name}")
        return conn

    def detach(self, conn: Connection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)

    def submit(self, conn: Connection, frame: Frame, received: float) -> None:
        self.truth["requests"] += 1
        self._queue.put_nowait((conn, frame, received))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # --- the line ------------------------------------------------------------------------------
    async def _serve(self) -> None:
        while True:
            conn, frame, received = await self._queue.get()
            try:
                await self._transact(conn, frame, received)
            except Exception:  # a bug in one answer must not stop the bus
                self.truth["internal_errors"] += 1
                log.exception("bus %s: request %s failed", self.name, frame)

    async def _transact(self, conn: Connection, frame: Frame, received: float) -> None:
        wire = self.wire
        bt = wire.byte_time()
        request_len = len(frame.data) + 12
        start = max(received, self._busy_until)
        end_of_request = start + (request_len * bt if wire.request_on_wire else 0.0)
        targets = self._targets(frame.address)
        now = self.clock()
        hits = self.faults.draw(self.name, targets[0].address if len(targets) == 1 else None, now)
        if "echo" in hits:
            self._count(targets, "echo")
            conn.port.write(frame.to_bytes())
        replies: list[bytes] = []
        answering: list[Meter] = []
        for meter in targets:
            meter_hits = hits if len(targets) == 1 else self.faults.draw(self.name, meter.address, now)
            if "dead" in meter_hits:  # a dead meter hears nothing and does nothing
                self._count([meter], "dead")
                continue
            meter.relay_stuck = self.faults.stuck(self.name, meter.address, now)
            out = meter.answer(frame, now)
            if not out:
                continue
            if "no_reply" in meter_hits:  # the meter acted, but its reply is lost on the line
                self._count([meter], "no_reply")
                continue
            if "link_drop" in meter_hits:
                self._count([meter], "link_drop")
                conn.port.drop()
                return
            answering.append(meter)
            pre = b"\xfe" * self.preamble.get(meter.address, 0)
            replies.append(pre + out[0])
        if not replies:
            self._busy_until = end_of_request + wire.gap
            return
        delay = wire.delay_min + (wire.delay_max - wire.delay_min) * self.rng.random() if wire.baud else 0.0
        data = replies[0]
        if len(replies) > 1:  # several meters answered at once: the line carries their sum, garbled
            data = self._collide(replies)
            self.truth["collisions"] += 1
        else:
            data = self._damage(answering[0], data, hits)
            if "late_reply" in hits:
                delay = float(hits["late_reply"].params.get("delay_s", 2.0))
        begin = end_of_request + delay
        sent = await self._send(conn, data, begin, bt)
        self._busy_until = begin + len(data) * bt + wire.gap
        if sent and len(replies) == 1 and not {"corrupt", "truncated", "late_reply"} & hits.keys():
            answering[0].truth["delivered"] += 1

    def _targets(self, address: str) -> list[Meter]:
        meter = self.meters.get(address)
        if meter is not None:
            return [meter]
        if address == BROADCAST or "A" in address:
            found = [m for m in self.meters.values() if address == BROADCAST or m.addressed(address)]
            if found:
                return found
        # an address written by 15/0A may have moved: re-index lazily
        self.meters = {m.address: m for m in self.meters.values()}
        meter = self.meters.get(address)
        return [meter] if meter else []

    def _damage(self, meter: Meter, data: bytes, hits: dict[str, FaultRule]) -> bytes:
        if "garbage" in hits:
            self._count([meter], "garbage")
            size = int(hits["garbage"].params.get("bytes", 8))
            data = bytes(self.rng.randrange(256) for _ in range(size)) + data
        if "corrupt" in hits:
            self._count([meter], "corrupt")
            data = data[:-2] + bytes([data[-2] ^ 0x5A]) + data[-1:]
        if "truncated" in hits:
            self._count([meter], "truncated")
            data = data[: max(1, len(data) // 2)]
        if "late_reply" in hits:
            self._count([meter], "late_reply")
        return data

    def _collide(self, replies: list[bytes]) -> bytes:
        size = max(len(r) for r in replies)
        out = bytearray(size)
        for r in replies:
            for i, b in enumerate(r):
                out[i] |= b  # RS-485 drivers fighting: dominant bits win
        out[size // 2] ^= 0xFF
        return bytes(out)

    def _count(self, meters: list[Meter], kind: str) -> None:
        self.truth[f"fault_{kind}"] += 1
        for meter in meters:
            meter.truth[f"fault_{kind}"] += 1

    async def _send(self, conn: Connection, data: bytes, begin: float, bt: float) -> bool:
        """Write the reply as the wire would; False if the connection closed before it was all out."""
        loop_time = asyncio.get_running_loop().time
        offset = loop_time() - self.clock()  # wall clock -> loop clock
        for i in range(0, len(data), CHUNK if bt else len(data)):
            chunk = data[i : i + CHUNK] if bt else data
            due = begin + (i + len(chunk)) * bt + offset
            wait = due - loop_time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not conn.open:
                return False
            conn.port.write(chunk)
        self.truth["replies"] += 1
        return True
