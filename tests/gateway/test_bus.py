"""The gateway's bus on a real TCP link to an emulated line: priorities, failures, degradation."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from gateway.bus import BadFrame, Bus, Degraded, LinkIsDown, NoReply, Priority, Timing
from gateway.links import TcpLink
from protocols.dlt645 import decode, read_reply, read_request
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


# --- the reply path, byte by byte, against a scripted peer on a real socket ------------------------

REPLY = read_reply("000000000001", ENERGY, bytes(4))[0]  # 0.00 kWh
STRAY = read_reply("000000000009", ENERGY, bytes.fromhex("01000000"))[0]


@pytest.fixture
async def scripted():
    """A TCP peer that answers every request with `script`: (pause in s, bytes) steps; "drop" hangs up."""
    script: list[tuple[float, bytes | str]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(256):
                for pause, part in list(script):
                    await asyncio.sleep(pause)
                    if part == "drop":
                        writer.transport.abort()
                        return
                    assert isinstance(part, bytes)
                    writer.write(part)
                    await writer.drain()
        except ConnectionError:
            pass

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    link = TcpLink("scripted", "127.0.0.1", server.sockets[0].getsockname()[1], reconnect_min=0.05,
                   reconnect_max=0.1)
    bus = Bus(link, Timing(first_byte=0.3, inter_byte=0.1, gap=0.0, retries=0, preamble=0), degrade_after=99)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(link.run(stop)), asyncio.create_task(bus.run(stop))]
    assert await link.wait_up(5)
    try:
        yield script, bus, link
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        server.close()


async def test_a_reply_split_by_pauses_shorter_than_the_inter_byte_timeout_is_one_frame(scripted):
    script, bus, _ = scripted
    script[:] = [(0.05, REPLY[:3]), (0.06, REPLY[3:9]), (0.06, REPLY[9:])]  # each gap < 0.1 s, total > 0.1 s
    assert await read(bus, "000000000001") == 0.0


async def test_a_pause_longer_than_the_inter_byte_timeout_makes_a_bad_frame(scripted):
    script, bus, _ = scripted
    script[:] = [(0.0, REPLY[:9]), (0.25, REPLY[9:])]
    with pytest.raises(BadFrame, match=r"9 bytes .*truncated"):
        await read(bus, "000000000001")
    assert bus.stats["bad_frames"] == 1


async def test_silence_is_no_reply_and_a_stray_frame_before_the_reply_is_counted(scripted):
    script, bus, _ = scripted
    with pytest.raises(NoReply, match=r"within 0\.3 s"):
        await read(bus, "000000000001")
    script[:] = [(0.0, STRAY), (0.02, b"\xfe\xfe" + REPLY)]
    assert await read(bus, "000000000001") == 0.0
    assert bus.stats["stray_frames"] == 1 and bus.stats["no_reply"] == 1


async def test_only_a_stray_frame_is_a_bad_frame_not_a_reply(scripted):
    script, bus, _ = scripted
    script[:] = [(0.0, STRAY)]
    with pytest.raises(BadFrame, match="no valid frame"):
        await read(bus, "000000000001")


async def test_a_drop_mid_reply_is_link_down_and_the_next_request_works_after_reconnecting(scripted):
    script, bus, link = scripted
    script[:] = [(0.0, REPLY[:5]), (0.02, "drop")]
    with pytest.raises(LinkIsDown, match="dropped"):
        await read(bus, "000000000001")
    script[:] = [(0.0, REPLY)]
    assert await link.wait_up(5)
    assert await read(bus, "000000000001") == 0.0
    assert link.stats["bytes_in"] == 5 + len(REPLY)


# --- the bus's own bookkeeping: the gap, jobs queued before it runs, stopping -----------------------

@pytest.fixture
async def echo_peer():
    """A TCP peer that answers every request with REPLY and notes when each request arrived."""
    arrivals: list[float] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(256):
                arrivals.append(time.monotonic())
                writer.write(REPLY)
                await writer.drain()
        except ConnectionError:
            pass

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    link = TcpLink("peer", "127.0.0.1", server.sockets[0].getsockname()[1])
    stop = asyncio.Event()
    task = asyncio.create_task(link.run(stop))
    assert await link.wait_up(5)
    try:
        yield link, arrivals
    finally:
        stop.set()
        await task
        server.close()


async def test_the_gap_keeps_the_line_quiet_and_the_caller_hears_after_it(echo_peer):
    link, arrivals = echo_peer
    bus = Bus(link, Timing(first_byte=0.5, inter_byte=0.1, gap=0.3, retries=0, preamble=0))
    stop = asyncio.Event()
    queued = [asyncio.create_task(read(bus, "000000000001")) for _ in range(3)]  # before the bus runs
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in queued) and arrivals == []
    runner = asyncio.create_task(bus.run(stop))
    started = time.monotonic()
    assert await asyncio.gather(*queued) == [0.0, 0.0, 0.0]
    assert len(arrivals) == 3
    assert all(b - a >= 0.29 for a, b in itertools.pairwise(arrivals))  # nothing went out in a gap
    assert time.monotonic() - started >= 3 * 0.29  # each result came after its gap
    stop.set()
    await runner


async def test_stopping_the_bus_settles_every_job(echo_peer):
    link, arrivals = echo_peer
    bus = Bus(link, Timing(first_byte=0.5, inter_byte=0.1, gap=5.0, retries=0, preamble=0))
    stop = asyncio.Event()
    runner = asyncio.create_task(bus.run(stop))
    first = asyncio.create_task(read(bus, "000000000001"))
    second = asyncio.create_task(read(bus, "000000000001"))
    while not arrivals:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # the first job is answered and waits out its 5 s gap
    stop.set()
    await runner
    assert await first == 0.0  # answered before the stop: the result is not lost
    with pytest.raises(LinkIsDown, match="stopped"):
        await second
    with pytest.raises(LinkIsDown, match="stopped"):  # a job for a stopped bus (replaced by a reload) never hangs
        await asyncio.wait_for(read(bus, "000000000001"), 5)
    assert len(arrivals) == 1
