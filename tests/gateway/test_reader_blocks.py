"""Automatic block reads by the DL/T 645 reader, against metersim meters on a real TCP link.

The line's clock is fixed, so a meter answers the same values however it is asked: the readings of
merged block reads must equal those of single reads, with fewer bus transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from zoneinfo import ZoneInfo

import pytest

from gateway.archive import MeterConfig
from gateway.bus import Bus, Timing
from gateway.links import TcpLink
from gateway.model import Outcome
from gateway.reader import Dlt645Reader
from protocols.dlt645 import Frame, lookup, parse_request
from simulators.bus import Bus as Line
from simulators.bus import Wire
from simulators.meter import Meter
from simulators.tcp import serve_tcp

T = 1_760_000_000.0
TZ = ZoneInfo("Asia/Shanghai")
TIMING = Timing(first_byte=0.5, inter_byte=0.1, gap=0.0, retries=0, preamble=0)
ENERGY = ["forward_active_energy", "forward_active_energy_t1", "forward_active_energy_t2",
          "forward_active_energy_t3", "forward_active_energy_t4"]


class NoBlocks(Meter):
    """A meter without block support (many 1997 meters): any …FF… read is answered with an error."""

    def answer(self, frame: Frame, now: float) -> list[bytes]:
        with contextlib.suppress(Exception):
            request = parse_request(frame, self.edition)
            item = lookup(request.di, self.edition) if request.di is not None else None
            if self.addressed(frame.address) and item is not None and item.is_block:
                self.truth["block_refused"] += 1
                return [self._error(request.function, 0x02)]
        return super().answer(frame, now)


def meter(address: str, cls: type[Meter] = Meter, **kw: object) -> Meter:
    return cls(address, epoch=T - 70 * 86400, now=T, **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def line_bus(*meters: Meter) -> AsyncIterator[Bus]:
    line = Line("line", meters, Wire(baud=0, delay_min=0.0, delay_max=0.0), clock=lambda: T)
    exposure = await serve_tcp(line, "127.0.0.1", 0)
    link = TcpLink("line", "127.0.0.1", exposure.port)
    bus = Bus(link, TIMING)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(link.run(stop)), asyncio.create_task(bus.run(stop))]
    assert await link.wait_up(5)
    try:
        yield bus
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await exposure.close()
        await line.close()


def same(outcome: Outcome) -> list[tuple[object, ...]]:
    """What a reading says, less the moment it was collected (instantaneous data: time == collected)."""
    assert all(r.time == r.collected and not r.frozen for r in outcome.readings)
    return sorted((r.meter, r.quantity, r.value, r.unit, r.station, r.link, r.plan, r.quality)
                  for r in outcome.readings)


async def read_both(bus: Bus, config: MeterConfig, items: list[str]) -> tuple[Outcome, Outcome, int, int]:
    """(merged outcome, singles outcome, transactions each took)."""
    merged, singles = Dlt645Reader("st", TZ, lambda m: TIMING), Dlt645Reader("st", TZ, lambda m: TIMING,
                                                                              merge_blocks=False)
    before = bus.stats["requests"]
    a = await merged.read(bus, config, items, plan="p")
    middle = bus.stats["requests"]
    b = await singles.read(bus, config, items, plan="p")
    return a, b, middle - before, bus.stats["requests"] - middle


async def test_energy_total_and_tariffs_are_one_block_read_with_the_readings_of_single_reads():
    async with line_bus(meter("000000000001")) as bus:
        items = [*ENERGY, "voltage_a", "voltage_b"]
        a, b, merged_tx, single_tx = await read_both(bus, MeterConfig(address="000000000001", link="line"), items)
    assert a.ok and b.ok
    assert same(a) == same(b) and len(a.readings) == 7
    assert [r.quantity for r in a.readings] == items  # plan order, and nothing the plan did not ask for
    assert (merged_tx, single_tx) == (2, 7)  # energy block + voltage block, against one read per item


async def test_a_meter_that_refuses_blocks_gets_single_reads_and_is_remembered():
    refusing = meter("000000000002", NoBlocks)
    async with line_bus(refusing) as bus:
        config = MeterConfig(address="000000000002", link="line")
        reader = Dlt645Reader("st", TZ, lambda m: TIMING)
        first = await reader.read(bus, config, ENERGY, plan="p")
        assert refusing.truth["block_refused"] == 1 and reader.stats["block_fallbacks"] == 1
        before = bus.stats["requests"]
        second = await reader.read(bus, config, ENERGY, plan="p")
        assert bus.stats["requests"] - before == 5 and refusing.truth["block_refused"] == 1  # not asked again
        _, singles, _, _ = await read_both(bus, config, ENERGY)
    assert first.ok and second.ok
    assert same(first) == same(second) == same(singles)
    assert reader.no_blocks == {"000000000002": {0x0001FF00}}


async def test_a_1997_meter_without_block_support_and_a_1997_meter_with_it():
    async with line_bus(meter("000000000003", NoBlocks, edition=1997), meter("000000000004", edition=1997)) as bus:
        items = ["forward_active_energy", "forward_active_energy_t1", "voltage_a", "current_a"]
        for address, merged_tx in (("000000000003", 5), ("000000000004", 3)):
            config = MeterConfig(address=address, link="line", edition=1997)
            a, b, tx, single_tx = await read_both(bus, config, items)
            assert a.ok and b.ok and same(a) == same(b) and len(a.readings) == 4
            assert (tx, single_tx) == (merged_tx, 4)  # refused block + 2 singles + 2 others; block + 2 others


async def test_members_a_meter_does_not_answer_stay_single_reads_with_the_same_outcome():
    # configured for 4 tariffs, the meter has 2: t3 and t4 are missing from the block and read alone
    async with line_bus(meter("000000000005", tariffs=2)) as bus:
        a, b, tx, single_tx = await read_both(bus, MeterConfig(address="000000000005", link="line"), ENERGY)
    assert same(a) == same(b)
    assert (a.ok, a.reason, a.detail) == (b.ok, b.reason, b.detail)
    assert (tx, single_tx) == (3, 5)


async def test_a_big_block_is_not_read_for_two_items_and_members_past_the_tariffs_are_read_alone():
    async with line_bus(meter("000000000006")) as bus:
        config = MeterConfig(address="000000000006", link="line", tariffs=14)
        a, b, tx, single_tx = await read_both(bus, config, ENERGY[:2])
        assert same(a) == same(b) and (tx, single_tx) == (2, 2)  # 15 members cost more than two single reads
        items = ["forward_active_energy", "forward_active_energy_t1", "forward_active_energy_t4"]
        config = MeterConfig(address="000000000006", link="line", tariffs=2)
        a, b, tx, single_tx = await read_both(bus, config, items)
    assert a.ok and same(a) == same(b) and len(a.readings) == 3
    assert (tx, single_tx) == (2, 3)  # configured for 2 tariffs: the block for total and t1, t4 alone


@pytest.mark.parametrize("items", [["status_word_1", "status_word_3"], ["active_power", "active_power_a"]])
async def test_other_blocks_merge_too(items):
    async with line_bus(meter("000000000007")) as bus:
        a, b, tx, single_tx = await read_both(bus, MeterConfig(address="000000000007", link="line"), items)
    assert a.ok and same(a) == same(b) and (tx, single_tx) == (1, 2)
    assert a.reason is None and b.reason is None


async def test_an_item_longer_than_one_frame_is_read_with_follow_ups_and_decoded_whole():
    from protocols.dlt645 import decode_data, find  # noqa: PLC0415
    from simulators.meter import Registers  # noqa: PLC0415

    sim = meter("000000000003")
    async with line_bus(sim) as bus:
        reader = Dlt645Reader("st", TZ, lambda m: TIMING)
        before = bus.stats["requests"]
        outcome = await reader.read(bus, MeterConfig(address="000000000003", link="line"), ["daily_freeze_last1"],
                                    plan="p")
        transactions = bus.stats["requests"] - before
    payload = Registers(sim).payload(find("daily_freeze_last1", 2007).di, T)
    assert payload is not None and len(payload) > 200  # more than one frame's DATA
    decoded = decode_data(find("daily_freeze_last1", 2007).di, payload, 2007).values.items()
    expected = {name: q.value.isoformat() if hasattr(q.value, "isoformat") else q.value for name, q in decoded
                if "_freeze_time_" not in name}
    assert outcome.ok, outcome.detail
    assert {r.quantity: r.value for r in outcome.readings} == expected and len(expected) > 10
    assert all(r.frozen for r in outcome.readings)  # stamped with the record's own freeze time
    assert transactions == 3  # its freeze time (05060001), the read and one follow-up (12 with SEQ 1)
