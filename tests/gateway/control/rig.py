"""A control test rig from real parts: metersim meters on a line served over real TCP, the
gateway's TcpLink and Bus, the real SQLite journal, and `Control` on top."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from gateway.archive import MeterConfig
from gateway.bus import Bus, Timing
from gateway.control.config import ControlConfig
from gateway.control.model import Command, State
from gateway.control.service import Control
from gateway.journal import Journal
from gateway.links import TcpLink
from simulators.bus import Bus as Line
from simulators.bus import Wire
from simulators.faults import FaultPlan
from simulators.meter import Meter
from simulators.tcp import TcpExposure, serve_tcp

TZ = ZoneInfo("Asia/Shanghai")
TIMING = Timing(first_byte=0.3, inter_byte=0.05, gap=0.0, retries=1, preamble=0)
FAST = {"verify_poll_first": 0.05, "verify_poll_max": 0.2, "verify_timeout": 3.0, "retry_every": 0.2,
        "trip_retry_every": 0.2, "quiet_hours": None}
WAIT = 20.0  # s: a guard against a hung test, never a performance claim


class Rig:
    """One station: four meters on one TCP line; `control` is rebuilt by `restart()`."""

    def __init__(self, tmp: Path, port: int, *, clock: Callable[[], float] = time.time, count: int = 4,
                 **config: Any) -> None:
        self.tmp = tmp
        self.port = port
        self.clock = clock
        self.config = ControlConfig(**{**FAST, **config})
        now = time.time()
        addresses = [f"{i:012d}" for i in range(1, count + 1)]
        self.meters = {a: Meter(a, epoch=now - 70 * 86400, now=now) for a in addresses}
        self.line = Line("line", self.meters.values(), Wire(baud=9600, delay_min=0.002, delay_max=0.002),
                         faults=FaultPlan())
        self.archive = {a: MeterConfig(address=a, link="line1") for a in addresses}
        self.exposure: TcpExposure | None = None
        self.link = TcpLink("line1", "127.0.0.1", port, reconnect_min=0.05, reconnect_max=0.1)
        self.bus = Bus(self.link, TIMING)
        self.journal = Journal(tmp / "journal.sqlite")
        self.stop = asyncio.Event()
        self.control_stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.control_task: asyncio.Task[None] | None = None
        self.control: Control

    def new_control(self) -> Control:
        return Control(self.config, self.journal, station="s1", tz=TZ, meter_for=self.archive.get,
                       bus_for=lambda m: self.bus, timing_for=lambda m: TIMING, clock=self.clock)

    async def __aenter__(self) -> Rig:
        await self.journal.open()
        self.tasks = [asyncio.create_task(self.link.run(self.stop)), asyncio.create_task(self.bus.run(self.stop))]
        await self.start_control()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_control()
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.serve(False)
        await self.line.close()
        await self.journal.close()

    async def serve(self, on: bool = True) -> None:
        """Put the line on the TCP port (the link comes up) or take it off."""
        if on and self.exposure is None:
            self.exposure = await serve_tcp(self.line, "127.0.0.1", self.port)
            assert await self.link.wait_up(WAIT)
        elif not on and self.exposure is not None:
            await self.exposure.close()
            self.exposure = None

    async def start_control(self) -> None:
        self.control = self.new_control()
        await self.control.start()
        self.control_stop = asyncio.Event()
        self.control_task = asyncio.create_task(self.control.run(self.control_stop))

    async def stop_control(self) -> None:
        if self.control_task is not None:
            self.control_stop.set()
            await self.control_task
            self.control_task = None

    async def restart(self) -> None:
        """A new Control and a reopened journal file: all that survives is what was committed."""
        await self.stop_control()
        await self.journal.close()
        self.journal = Journal(self.tmp / "journal.sqlite")
        await self.journal.open()
        await self.start_control()

    async def until(self, check: Callable[[], bool], what: str) -> None:
        end = time.monotonic() + WAIT
        while not check():
            if time.monotonic() > end:
                raise AssertionError(f"never happened: {what}")
            await asyncio.sleep(0.01)

    async def wait(self, command: Command | str, until: Callable[[Command], bool] | None = None) -> Command:
        """Poll the command until `until` (default: terminal) holds; fail after WAIT seconds."""
        cid = command if isinstance(command, str) else command.id
        check = until or (lambda c: c.state.terminal)
        end = time.monotonic() + WAIT
        while True:
            found = await self.control.get(cid)
            if check(found):
                return found
            if time.monotonic() > end:
                raise AssertionError(f"command {cid} never got there: {found.public()}")
            await asyncio.sleep(0.02)

    def accepted(self, address: str | None = None) -> int:
        meters = [self.meters[address]] if address else list(self.meters.values())
        return sum(m.truth["control_accepted"] for m in meters)

    def control_frames(self, address: str) -> int:
        m = self.meters[address].truth
        return m["control_accepted"] + m["control_refused"]


def state_is(*states: State) -> Callable[[Command], bool]:
    return lambda c: c.state in states
