"""The gateway's bus on a real TCP link to an emulated line: priorities, failures, degradation."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.bus import BadFrame, Bus, Degraded, LinkIsDown, NoReply, Priority, Timing
from gateway.links import TcpLink
from protocols.dlt645 import decode, read_request
from simulators.bus import Bus as Line
from simulators.bus import Wire
from simulators.faults import FaultPlan, FaultRule
from simulators.meter import Meter
from simulators.tcp import serve_tcp

ENERGY = 0x00010000
TIMING = Timing(first_byte=0.3, inter_byte=0.05, gap=0.0, retries=1, preamble=0)


@pytest.fixture
async def setup():
    now = time.time()
    line = Line("line", [Meter(f"{i:012d}", epoch=now - 70 * 86400, now=now) for i in range(1, 5)],
                Wire(baud=9600, delay_min=0.005, delay_max=0.005), faults=FaultPlan())
    exposure = await serve_tcp(line, "127.0.0.1", 0)
    link = TcpLink("bus1", "127.0.0.1", exposure.port)
    bus = Bus(link, TIMING, degrade_after=3, probe_min=0.5, probe_max=0.5)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(link.run(stop)), asyncio.create_task(bus.run(stop))]
    assert await link.wait_up(5)
    try:
        yield line, bus, link
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await exposure.close()
        await line.close()


async def read(bus: Bus, address: str, priority: Priority = Priority.ROUTINE) -> float:
    frame = await bus.transact(read_request(address, ENERGY), address, priority=priority)
    assert frame is not None
    return decode(frame).values["forward_active_energy"].value


async def test_reads_and_drops_local_echo(setup):
    line, bus, _ = setup
    line.faults.replace([FaultRule("echo")])
    assert await read(bus, "000000000001") > 0
    assert line.truth["fault_echo"] == 1


async def test_control_goes_ahead_of_queued_polls(setup):
    _, bus, _ = setup
    order: list[str] = []

    async def job(address: str, priority: Priority) -> None:
        await read(bus, address, priority)
        order.append(f"{address[-1]}{priority.name[0]}")

    routine = [asyncio.create_task(job(f"00000000000{i}", Priority.ROUTINE)) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    control = asyncio.create_task(job("000000000004", Priority.CONTROL))
    await asyncio.gather(*routine, control)
    assert order.index("4C") <= 1  # at most the job already on the wire went first


async def test_no_reply_bad_frame_and_retries(setup):
    line, bus, _ = setup
    line.faults.replace([FaultRule("dead", meter="000000000002")])
    with pytest.raises(NoReply):
        await read(bus, "000000000002")
    assert line.meters["000000000002"].truth["fault_dead"] == 2  # first try + one retry
    line.faults.replace([FaultRule("corrupt", meter="000000000003")])
    with pytest.raises(BadFrame, match="bad_checksum"):
        await read(bus, "000000000003")
    line.faults.rules = [FaultRule("corrupt", meter="000000000003", every=2)]
    assert await read(bus, "000000000003") > 0  # the retry got through
    assert bus.stats["retries"] >= 2


async def test_a_failing_meter_is_degraded_then_recovers(setup):
    line, bus, _ = setup
    line.faults.replace([FaultRule("dead", meter="000000000002")])
    for _ in range(3):
        with pytest.raises(NoReply):
            await read(bus, "000000000002")
    asked = line.meters["000000000002"].truth["fault_dead"]
    with pytest.raises(Degraded):
        await read(bus, "000000000002")
    assert line.meters["000000000002"].truth["fault_dead"] == asked  # not even asked
    assert await read(bus, "000000000001") > 0  # the others are unaffected
    assert bus.degraded() == ["000000000002"]
    line.faults.rules = []
    await asyncio.sleep(0.6)  # probe time
    assert await read(bus, "000000000002") > 0
    assert bus.degraded() == []


async def test_link_down_is_reported_not_waited_for(setup):
    line, bus, link = setup
    line.faults.replace([FaultRule("link_drop")])
    with pytest.raises((LinkIsDown, NoReply)):
        await read(bus, "000000000001")
    line.faults.replace([])
    assert not link.up or await link.wait_up(5)
    assert await link.wait_up(5)
    assert await read(bus, "000000000001") > 0
