"""Clock drift check and broadcast time sync against metersim meters with wrong clocks, over real TCP."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway.archive import MeterConfig
from gateway.bus import Bus, Timing
from gateway.clock import ClockWatch, next_daily
from gateway.config import Config
from gateway.links import TcpLink
from simulators.bus import Bus as SimBus
from simulators.bus import Wire
from simulators.meter import Meter
from simulators.tcp import serve_tcp

TZ = ZoneInfo("Asia/Shanghai")
TIMING = Timing(first_byte=0.5, inter_byte=0.1, gap=0.02, retries=1, preamble=4)
OFFSETS = {"000000000001": 300.0, "000000000002": -90.0, "000000000003": 5.0, "000000000004": 120.0}
EDITIONS = {"000000000004": 1997}


@dataclass
class Rig:
    sim: SimBus
    meters: dict[str, Meter]
    bus: Bus
    link: TcpLink
    config: Config
    port: int

    def offset(self, address: str) -> float:
        meter = self.meters[address]
        now = time.time()
        return meter.clock_local(now) - meter.real_local(now)


def make_config(port: int, addresses: list[str], **time_sync: Any) -> Config:
    return Config.model_validate({
        "station": {"name": "st", "timezone": "Asia/Shanghai"},
        "links": [{"kind": "tcp", "name": "bus1", "host": "127.0.0.1", "port": port}],
        "meters": [{"address": a, "link": "bus1", "edition": EDITIONS.get(a, 2007)} for a in addresses],
        "time_sync": {"drift_threshold": 60, "check_every": 3600, **time_sync},
    })


@contextlib.asynccontextmanager
async def rig(offsets: dict[str, float] = OFFSETS, extra: tuple[str, ...] = (), **time_sync: Any) -> AsyncIterator[Rig]:
    now = time.time()
    meters = {}
    for address, offset in offsets.items():
        meter = Meter(address, edition=EDITIONS.get(address, 2007), epoch=now - 70 * 86400, now=now)
        meter.clock_offset_s = offset
        meters[address] = meter
    sim = SimBus("bus1", meters.values(), Wire(baud=2400, delay_min=0.02, delay_max=0.08))  # a real line's timing
    exposure = await serve_tcp(sim, "127.0.0.1", 0)
    link = TcpLink("bus1", "127.0.0.1", exposure.port, reconnect_min=0.05, reconnect_max=0.2)
    bus = Bus(link, TIMING)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(link.run(stop)), asyncio.create_task(bus.run(stop))]
    try:
        assert await link.wait_up(3.0)
        yield Rig(sim, meters, bus, link, make_config(exposure.port, [*offsets, *extra], **time_sync), exposure.port)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5.0)
        await exposure.close()
        await sim.close()


def watch_of(r: Rig, **kwargs: Any) -> ClockWatch:
    return ClockWatch(lambda: r.config, lambda m: r.bus if m.link == "bus1" else None, lambda m: TIMING, **kwargs)


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger="gateway.clock")
    yield caplog


def clock_logs(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gateway.clock" and r.levelno == level]


async def test_offenders_are_found_with_their_drift_and_a_broadcast_sync_puts_them_right(warnings):
    async with rig() as r:
        watch = watch_of(r, verify_after=0.0)
        assert await watch.check_due() == 4
        drifts = watch.drifts()
        for address, offset in OFFSETS.items():  # 2007 and 1997 meters alike, within a second
            assert drifts[address] == pytest.approx(offset, abs=1.0), address
        assert [a for a, _ in watch.offenders()] == ["000000000001", "000000000004", "000000000002"]
        warned = clock_logs(warnings, logging.WARNING)
        assert len(warned) == 3 and "meter 000000000001: clock is +30" in warned[0]  # +300 or +301 s

        assert await watch.check_due() == 0  # checked at most every check_every
        await watch.check(MeterConfig(address="000000000001", link="bus1"))
        assert len(clock_logs(warnings, logging.WARNING)) == 3  # one warning per meter, not per check

        assert await watch.sync() == {"bus1": "ok"}
        for address in OFFSETS:  # the simulator's ground truth: every clock is right now
            assert abs(r.offset(address)) < 0.1, address
        assert await watch.check_due() == 3  # the offenders are verified at once (verify_after=0)
        assert all(abs(d) <= 1.0 for a, d in watch.drifts().items() if a != "000000000003")
        assert watch.offenders() == []
        back = clock_logs(warnings, logging.INFO)
        assert sum("back within" in line for line in back) == 3

        status = watch.status()
        assert status["checked"] == 4 and status["offenders"] == 0 and status["last_sync_buses"] == {"bus1": "ok"}
        assert status["counters"]["syncs"] == 1 and status["counters"]["checks"] == 8


async def test_run_syncs_at_the_configured_time_and_checks_again():
    at = (dt.datetime.now(TZ) + dt.timedelta(seconds=3)).time().replace(microsecond=0)
    async with rig({"000000000001": 300.0}, at=at.isoformat()) as r:
        watch = watch_of(r, tick=0.2, verify_after=0.5)
        stop = asyncio.Event()
        task = asyncio.create_task(watch.run(stop))
        try:
            deadline = time.monotonic() + 10
            while watch.drifts().get("000000000001") is None:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert watch.drifts()["000000000001"] == pytest.approx(300, abs=1.0)
            assert watch.last_sync is None
            while abs(watch.drifts()["000000000001"]) > 1.0:  # synced at `at`, then verified
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert watch.last_sync is not None
            synced = dt.datetime.fromtimestamp(watch.last_sync, TZ)
            assert dt.datetime.combine(synced.date(), at, tzinfo=TZ) <= synced
            assert abs(r.offset("000000000001")) < 0.1
        finally:
            stop.set()
            await asyncio.wait_for(task, 3.0)


async def test_a_silent_meter_and_a_dead_link_are_reported_not_fatal():
    async with rig({"000000000001": 0.0}, extra=("000000000077",)) as r:
        watch = watch_of(r)
        assert await watch.check_due() == 2
        assert watch.drifts().keys() == {"000000000001"}
        status = watch.status()
        assert status["unreadable"] == 1 and status["unreadable_meters"]["000000000077"].startswith("no_reply")
        assert await watch.check_due() == 0  # the silent meter is retried later, not on every tick

        dead = Bus(TcpLink("bus1", "127.0.0.1", r.port), TIMING, link_grace=0.1)  # never started: down
        dead_stop = asyncio.Event()
        dead_task = asyncio.create_task(dead.run(dead_stop))
        watch.bus_for = lambda m: dead
        result = await watch.sync()
        assert result["bus1"].startswith("link_down")
        assert await watch.check(MeterConfig(address="000000000001", link="bus1")) is None
        assert watch.status()["unreadable_meters"]["000000000001"].startswith("link_down")
        dead_stop.set()
        await dead_task


def test_next_daily_is_strictly_later_in_station_time():
    now = dt.datetime(2024, 5, 1, 3, 0, tzinfo=TZ).timestamp()
    assert next_daily(dt.time(3, 0), now, TZ) == now + 86400
    assert next_daily(dt.time(3, 0), now - 1, TZ) == now
    assert next_daily(dt.time(2, 59), now, TZ) == now + 86400 - 60


async def test_a_time_read_just_after_midnight_takes_the_date_again():
    """date D at 23:59:59.9, time 00:00:00 a moment later: the meter's day is D+1, not D."""
    async with rig({"000000000001": 0.0}) as r:
        watch = watch_of(r)
        script = iter([(dt.date(2024, 5, 1), 0.0, 0.0), (dt.time(0, 0, 0), 100.0, 100.2),
                       (dt.date(2024, 5, 2), 0.0, 0.0)])

        async def scripted(bus, meter, name, timing):
            return next(script)

        watch._read = scripted  # type: ignore[method-assign]
        drift, shown = await watch._measure(r.bus, r.config.meters[0], TZ)
        assert shown == "2024-05-02T00:00:00"
        midnight = dt.datetime(2024, 5, 2, tzinfo=TZ).timestamp()
        assert drift == pytest.approx(midnight + 0.5 - (100.2 - 0.02 - 0.09), abs=1e-6)
