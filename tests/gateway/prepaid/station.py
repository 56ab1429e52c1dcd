"""A station from real parts for the prepaid tests: one metersim meter on a line served over real
TCP, the gateway's link and bus, the SQLite journal, the real Control and Prepaid on top, and
routine polling of the energy register as the scheduler does it."""

from __future__ import annotations

import asyncio
import time
from zoneinfo import ZoneInfo

from gateway.archive import MeterConfig
from gateway.bus import Bus, Timing
from gateway.control.config import ControlConfig
from gateway.control.model import State
from gateway.control.service import Control
from gateway.journal import Journal
from gateway.links import TcpLink
from gateway.model import Reading
from gateway.prepaid import Prepaid, PrepaidConfig
from gateway.prepaid.config import TOTAL
from protocols.dlt645 import decode, read_request
from simulators.bus import Bus as Line
from simulators.bus import Wire
from simulators.faults import FaultPlan
from simulators.meter import Meter
from simulators.tcp import serve_tcp

M = "000000000001"
TIMING = Timing(first_byte=0.3, inter_byte=0.05, gap=0.0, retries=1, preamble=0)
CONTROL = ControlConfig(verify_poll_first=0.05, verify_poll_max=0.2, verify_timeout=3.0, retry_every=0.2,
                        trip_retry_every=0.2, quiet_hours=None)
PREPAID = PrepaidConfig(enabled=True, restore="close")
WAIT = 30.0  # s: a guard against a hung test, never a performance claim


async def until(check, what):
    end = time.monotonic() + WAIT
    while not await check():
        assert time.monotonic() < end, f"never happened: {what}"
        await asyncio.sleep(0.02)


class Station:
    """One meter on a line over real TCP, the gateway's link and bus, the journal, Control and Prepaid."""

    def __init__(self, tmp_path, port):
        self.path, self.port = tmp_path / "journal.sqlite", port
        now = time.time()
        self.meter = Meter(M, epoch=now - 70 * 86400, now=now)
        self.meter.set_load(36000.0, now)  # 10 kWh a second: a balance drains in a few polls
        self.line = Line("line", [self.meter], Wire(baud=9600, delay_min=0.002, delay_max=0.002), faults=FaultPlan())
        self.archive = {M: MeterConfig(address=M, link="line1")}
        self.link = TcpLink("line1", "127.0.0.1", port, reconnect_min=0.05, reconnect_max=0.1)
        self.bus = Bus(self.link, TIMING)
        self.poll_errors: list[str] = []

    async def __aenter__(self):
        self.exposure = await serve_tcp(self.line, "127.0.0.1", self.port)
        self.stop = asyncio.Event()
        self.tasks = [asyncio.create_task(self.link.run(self.stop)), asyncio.create_task(self.bus.run(self.stop))]
        assert await self.link.wait_up(WAIT)
        await self.start_daemon()
        self.tasks.append(asyncio.create_task(self.poll()))
        return self

    async def __aexit__(self, *exc):
        await self.stop_daemon()
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.exposure.close()
        await self.line.close()

    async def start_daemon(self, before=None):
        """What meterd does at startup: journal, control, prepaid (and `before` on the journal first)."""
        self.journal = Journal(self.path)
        await self.journal.open()
        if before is not None:
            await before(self.journal)
        self.control = Control(CONTROL, self.journal, station="s1", tz=ZoneInfo("Asia/Shanghai"),
                               meter_for=self.archive.get, bus_for=lambda m: self.bus, timing_for=lambda m: TIMING)
        await self.control.start()
        self.prepaid = Prepaid(PREPAID, self.journal, self.control, station="s1", meters=self.archive.get)
        await self.prepaid.start()
        self.daemon_stop = asyncio.Event()
        self.daemon = [asyncio.create_task(self.control.run(self.daemon_stop)),
                       asyncio.create_task(self.prepaid.run(self.daemon_stop))]

    async def stop_daemon(self):
        self.daemon_stop.set()
        await asyncio.gather(*self.daemon)
        await self.journal.close()

    async def poll(self):
        """Routine polling, as the scheduler does: read, journal, then let the policy see it."""
        while not self.stop.is_set():
            try:
                frame = await self.bus.transact(read_request(M, 0x00010000), M)
                value = decode(frame).values[TOTAL].value
                reading = Reading(M, TOTAL, value, "kWh", time.time(), time.time())
                await self.journal.append([reading])
                self.prepaid.observe([reading])
            except Exception as exc:  # the journal is closed for a moment during a restart
                self.poll_errors.append(repr(exc))
            await asyncio.sleep(0.05)

    def frames(self):
        return self.meter.truth["control_accepted"] + self.meter.truth["control_refused"]

    async def command(self, request_id):
        found = [c for c in await self.control.list(M, limit=1000) if c.request_id == request_id]
        return found[0] if found else None


async def verified(station, request_id):
    async def check():
        command = await station.command(request_id)
        assert command is None or command.state in (State.PENDING, State.SENT, State.ACKNOWLEDGED, State.VERIFIED), \
            command.public()
        return command is not None and command.state is State.VERIFIED
    await until(check, f"{request_id} verified")


async def holds(value):
    """`until(lambda: holds(x == y), ...)`: a plain condition as the awaitable `until` wants."""
    return value
