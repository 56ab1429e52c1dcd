"""The emulated line over a real TCP socket: wire timing, collisions and every fault kind."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import pytest

from protocols.dlt645 import (
    WILDCARD,
    Action,
    Auth,
    BadChecksum,
    Garbage,
    RelayStatus,
    TruncatedFrame,
    broadcast_time_request,
    control_request,
    read_request,
)
from simulators.bus import Bus, Wire
from simulators.faults import FaultPlan, FaultRule
from simulators.meter import Meter
from simulators.tcp import serve_tcp
from tests.simulators.client import Client

ENERGY = 0x00010000


def fleet(n: int = 4) -> list[Meter]:
    now = time.time()
    return [Meter(f"{i:012d}", epoch=now - 70 * 86400, now=now) for i in range(1, n + 1)]


async def start(bus: Bus) -> tuple[Client, object]:
    exposure = await serve_tcp(bus, "127.0.0.1", 0)
    return await Client.tcp("127.0.0.1", exposure.port), exposure


async def stop(client: Client, exposure, bus: Bus) -> None:
    await client.close()
    await exposure.close()
    await bus.close()


@pytest.mark.parametrize(("baud", "delay", "di"), [(2400, 0.03, ENERGY), (9600, 0.05, ENERGY),
                                                    (1200, 0.02, 0x0001FF00), (2400, 0.0, 0x0201FF00)])
async def test_wire_timing_matches_bytes_and_reply_delay(baud, delay, di):
    meters = fleet(2)
    bus = Bus("b", meters, Wire(baud=baud, delay_min=delay, delay_max=delay), preamble={meters[0].address: 4})
    client, exposure = await start(bus)
    try:
        for _ in range(3):
            request = read_request(meters[0].address, di)
            reply = await client.frame(request)
            assert reply is not None
            wire_bytes = len(request) + 4 + len(reply.data) + 12
            expected = wire_bytes * 11 / baud + delay
            assert client.last_elapsed == pytest.approx(expected, rel=0.10)
    finally:
        await stop(client, exposure, bus)


async def test_only_the_addressed_meter_answers_and_broadcast_gets_none():
    meters = fleet(3)
    bus = Bus("b", meters, Wire(baud=9600, delay_min=0.01, delay_max=0.01))
    client, exposure = await start(bus)
    try:
        reply = await client.ask(read_request(meters[1].address, ENERGY))
        assert reply is not None and reply.address == meters[1].address
        assert await client.frame(broadcast_time_request(dt.datetime.now()), timeout=0.5) is None
        assert [m.truth["received"] for m in meters] == [1, 2, 1]
        assert await client.frame(read_request("000000009999", ENERGY), timeout=0.3) is None
    finally:
        await stop(client, exposure, bus)


async def test_wildcard_read_with_several_meters_collides():
    meters = fleet(3)
    bus = Bus("b", meters, Wire(baud=9600, delay_min=0.01, delay_max=0.01))
    client, exposure = await start(bus)
    try:
        assert await client.frame(read_request(WILDCARD, ENERGY), timeout=0.5) is None
        assert bus.truth["collisions"] == 1
        assert client.errors
        alone = Bus("c", fleet(1), Wire(baud=9600, delay_min=0.01, delay_max=0.01))
        c2, e2 = await start(alone)
        try:
            reply = await c2.ask(read_request(WILDCARD, ENERGY))
            assert reply is not None and reply.address == "000000000001"
        finally:
            await stop(c2, e2, alone)
    finally:
        await stop(client, exposure, bus)


async def faulty(rule: FaultRule) -> tuple[Bus, Client, object, list[Meter]]:
    meters = fleet(2)
    bus = Bus("b", meters, Wire(baud=9600, delay_min=0.01, delay_max=0.01), faults=FaultPlan([rule]))
    client, exposure = await start(bus)
    return bus, client, exposure, meters


async def test_no_reply_and_dead_for_a_period():
    bus, client, exposure, meters = await faulty(FaultRule("no_reply", meter="000000000001"))
    try:
        assert await client.frame(read_request(meters[0].address, ENERGY), timeout=0.4) is None
        assert await client.ask(read_request(meters[1].address, ENERGY)) is not None
        assert meters[0].truth["fault_no_reply"] == 1 and meters[0].truth.get("delivered", 0) == 0
        bus.faults.replace([FaultRule("dead", meter="000000000002", end=time.time() + 0.6)], meter="000000000002")
        assert await client.frame(read_request(meters[1].address, ENERGY), timeout=0.3) is None
        await asyncio.sleep(0.4)
        assert await client.ask(read_request(meters[1].address, ENERGY)) is not None
        assert meters[1].truth["fault_dead"] == 1
    finally:
        await stop(client, exposure, bus)


async def test_late_reply_arrives_after_the_given_delay():
    bus, client, exposure, meters = await faulty(FaultRule("late_reply", params={"delay_s": 0.6}))
    try:
        assert await client.frame(read_request(meters[0].address, ENERGY), timeout=0.3) is None
        assert await client.frame(b"", timeout=1.0) is not None  # it does come, late
        assert bus.truth["fault_late_reply"] == 1
    finally:
        await stop(client, exposure, bus)


async def test_corrupt_truncated_and_garbage():
    bus, client, exposure, meters = await faulty(FaultRule("corrupt", every=2))
    try:
        assert await client.ask(read_request(meters[0].address, ENERGY)) is not None
        assert await client.frame(read_request(meters[0].address, ENERGY), timeout=0.4) is None
        assert any(isinstance(e, BadChecksum) for e in client.errors)
        bus.faults.replace([FaultRule("truncated")])
        assert await client.frame(read_request(meters[0].address, ENERGY), timeout=0.4) is None
        assert any(isinstance(e, TruncatedFrame) for e in client.errors)
        bus.faults.replace([FaultRule("garbage")])
        assert await client.ask(read_request(meters[0].address, ENERGY)) is not None
        assert any(isinstance(e, Garbage) for e in client.errors)
        assert (bus.truth["fault_corrupt"], bus.truth["fault_truncated"], bus.truth["fault_garbage"]) == (1, 1, 1)
    finally:
        await stop(client, exposure, bus)


async def test_local_echo_is_sent_before_the_reply():
    bus, client, exposure, meters = await faulty(FaultRule("echo"))
    try:
        assert await client.ask(read_request(meters[0].address, ENERGY)) is not None
        assert client.framer.stats["echo"] == 1
        assert bus.truth["fault_echo"] == 1
    finally:
        await stop(client, exposure, bus)


async def test_link_drop_closes_the_connection():
    bus, client, exposure, meters = await faulty(FaultRule("link_drop"))
    try:
        assert await client.frame(read_request(meters[0].address, ENERGY), timeout=1.0) is None
        assert await client.reader.read(10) == b""
        assert bus.truth["fault_link_drop"] == 1
    finally:
        await stop(client, exposure, bus)


async def test_relay_stuck_acknowledges_control_without_moving():
    bus, client, exposure, meters = await faulty(FaultRule("relay_stuck", meter="000000000001"))
    try:
        deadline = meters[0].clock_datetime(time.time()) + dt.timedelta(minutes=5)
        reply = await client.ask(control_request(meters[0].address, Action.TRIP, deadline, auth=Auth(2)))
        assert reply is not None and reply.ok
        status = await client.ask(read_request(meters[0].address, 0x04000503))
        assert status is not None
        assert not RelayStatus.from_word(status.values["status_word_3"].value).relay_open
    finally:
        await stop(client, exposure, bus)
