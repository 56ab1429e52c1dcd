"""What a test rig does with metersim, over a real pty and a real TCP socket, with protocols.dlt645 as the client.

Every scenario runs on both transports: readings, freezes, events, every
control action and its status-word effect, refusals, follow-up frames and
a 1997 meter on the same line.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import serial_asyncio_fast

from protocols.dlt645 import (
    Action,
    Auth,
    Error1997,
    Error2007,
    ReadSequence,
    RelayStatus,
    Reply,
    control_request,
    decode,
    find,
    parse,
    read_request,
)
from simulators.bus import Bus, Wire
from simulators.meter import Meter
from simulators.pty import serve_pty
from simulators.tcp import serve_tcp
from tests.simulators.client import Client

PASSWORDS = {2: "123456"}
NEW, DELAYED, OLD = "000000000011", "000000000012", "000000000013"


@dataclass
class Line:
    client: Client
    meters: dict[str, Meter]

    async def read(self, address: str, name: str, edition: int = 2007) -> dict:
        sequence = ReadSequence(address, find(name, edition).di, edition)
        request: bytes | None = sequence.request
        frames = 0
        while request is not None:
            frame = await self.client.frame(request)
            assert frame is not None, f"no answer to {name}"
            frames += 1
            request = sequence.feed(decode(frame))
        reply = sequence.reply
        assert reply is not None and reply.ok and reply.complete, reply
        values = {k: q.value for k, q in reply.values.items()}
        values["__frames__"] = frames
        return values

    async def control(self, address: str, action: Action, *, password: str = "123456",
                      deadline_s: float = 600) -> Reply:
        meter = self.meters[address]
        deadline = meter.clock_datetime(time.time()) + dt.timedelta(seconds=deadline_s)
        reply = await self.client.ask(control_request(address, action, deadline, auth=Auth(2, password, "00000042")))
        assert reply is not None
        return reply

    async def relay(self, address: str) -> RelayStatus:
        return RelayStatus.from_word((await self.read(address, "status_word_3"))["status_word_3"])


@pytest.fixture(params=["tcp", "pty"])
async def line(request, tmp_path) -> AsyncIterator[Line]:
    now = time.time()
    meters = [Meter(NEW, epoch=now - 70 * 86400, now=now, passwords=PASSWORDS, phases=3),
              Meter(DELAYED, epoch=now - 70 * 86400, now=now, passwords=PASSWORDS, trip_delay_s=2),
              Meter(OLD, edition=1997, epoch=now - 70 * 86400, now=now)]
    bus = Bus("line", meters, Wire(baud=9600, delay_min=0.005, delay_max=0.015), preamble={NEW: 2})
    if request.param == "tcp":
        exposure = await serve_tcp(bus, "127.0.0.1", 0)
        client = await Client.tcp("127.0.0.1", exposure.port)
    else:
        exposure = await serve_pty(bus, str(tmp_path / "meterbus"))
        reader, writer = await serial_asyncio_fast.open_serial_connection(url=exposure.path, baudrate=9600)
        client = Client(reader, writer)
    try:
        yield Line(client, {m.address: m for m in meters})
    finally:
        await client.close()
        await exposure.close()
        await bus.close()


async def test_readings_agree(line):
    block = await line.read(NEW, "forward_active_energy_block")
    tariffs = sum(block[f"forward_active_energy_t{k}"] for k in range(1, 5))
    assert tariffs == pytest.approx(block["forward_active_energy"], abs=0.05)
    volts = await line.read(NEW, "voltage_block")
    amps = await line.read(NEW, "current_block")
    power = (await line.read(NEW, "active_power_block"))
    pf = (await line.read(NEW, "power_factor"))["power_factor"]
    for phase in "abc":
        expected = volts[f"voltage_{phase}"] * amps[f"current_{phase}"] * pf / 1000
        assert power[f"active_power_{phase}"] == pytest.approx(expected, rel=0.02, abs=0.002)
    assert (await line.read(NEW, "date"))["date"] == line.meters[NEW].clock_datetime(time.time()).date()


async def test_daily_freeze_comes_in_follow_up_frames(line):
    record = await line.read(NEW, "daily_freeze_last1")
    assert record["__frames__"] == 2
    midnight = line.meters[NEW].clock_datetime(time.time()).replace(hour=0, minute=0, second=0, microsecond=0)
    assert record["daily_freeze_time_last1"] == midnight
    single = await line.read(NEW, "daily_freeze_forward_active_energy_last1")
    assert single["forward_active_energy"] == record["forward_active_energy"]
    hourly = await line.read(NEW, "hourly_freeze_last1")
    assert hourly["forward_active_energy"] >= record["forward_active_energy"]


async def test_events_and_every_control_action(line):
    assert (await line.control(NEW, Action.TRIP)).ok
    status = await line.relay(NEW)
    assert status.relay_open and status.trip_commanded
    assert (await line.read(NEW, "trip_count"))["trip_count"] == 1
    assert (await line.read(NEW, "trip_record_last1"))["trip_operator"] == "00000042"
    assert (await line.control(NEW, Action.ALLOW_CLOSE)).ok
    waiting = await line.relay(NEW)
    assert waiting.relay_open and not waiting.trip_commanded
    assert line.meters[NEW].relay.press_button(line.meters[NEW], time.time())
    assert not (await line.relay(NEW)).relay_open
    assert (await line.control(NEW, Action.TRIP)).ok
    assert (await line.control(NEW, Action.CLOSE)).ok
    assert not (await line.relay(NEW)).relay_open
    assert (await line.control(NEW, Action.ALARM)).ok
    assert (await line.relay(NEW)).pre_trip_alarm
    assert (await line.control(NEW, Action.ALARM_RELEASE)).ok
    assert not (await line.relay(NEW)).pre_trip_alarm
    assert (await line.control(NEW, Action.HOLD)).ok
    assert (await line.relay(NEW)).hold
    assert (await line.control(NEW, Action.TRIP)).error == Error2007.OTHER
    assert not (await line.relay(NEW)).relay_open
    assert (await line.control(NEW, Action.HOLD_RELEASE)).ok
    assert not (await line.relay(NEW)).hold
    assert (await line.read(NEW, "close_count"))["close_count"] == 2


async def test_trip_delay_then_relay_opens(line):
    assert (await line.control(DELAYED, Action.TRIP)).ok
    during = await line.relay(DELAYED)
    assert during.trip_commanded and during.pre_trip_alarm and not during.relay_open
    await asyncio.sleep(2.1)
    assert (await line.relay(DELAYED)).relay_open


async def test_password_and_deadline_refusals(line):
    assert (await line.control(NEW, Action.TRIP, password="111111")).error == Error2007.UNAUTHORIZED
    assert (await line.control(NEW, Action.TRIP, deadline_s=-5)).error == Error2007.OTHER
    assert not (await line.relay(NEW)).relay_open
    assert line.meters[NEW].truth["control_refused"] == 2


async def test_1997_meter_on_the_same_line(line):
    values = await line.read(OLD, "forward_active_energy_block", 1997)
    assert values["forward_active_energy"] > 0
    reply = await line.client.ask(read_request(OLD, 0xC099, 1997))
    assert reply is not None and reply.edition == 1997 and reply.error == Error1997.BAD_DI
    assert parse(read_request(OLD, 0x9010, 1997)).control == 0x01


async def test_wire_timing_on_this_transport(line):
    """bytes x 11 / baud + reply delay, within 10 %, on the pty as on TCP (9600 Bd, delay 5-15 ms, 2 FE)."""
    for _ in range(3):
        request = read_request(NEW, find("forward_active_energy_block").di)
        frame = await line.client.frame(request)
        assert frame is not None
        wire = (len(request) + 2 + len(frame.data) + 12) * 11 / 9600
        assert wire + 0.005 * 0.9 <= line.client.last_elapsed <= (wire + 0.015) * 1.1
