"""A round's bookkeeping, in isolation: lanes per bus, outcomes counted only once the journal has
committed, a refused or failed append is the job's failure, and the round ends after its last commit.

The reader, journal and buses are stand-ins here (the end-to-end tests run the real ones)."""

from __future__ import annotations

import asyncio
from collections import Counter
from zoneinfo import ZoneInfo

import pytest

from gateway.archive import MeterConfig
from gateway.journal import BadReading
from gateway.model import Outcome, Reading, RoundStats
from gateway.plans import PlanConfig
from gateway.scheduler import LANES_PER_BUS, Scheduler

TZ = ZoneInfo("Asia/Shanghai")
PLAN = PlanConfig(name="p", items=["voltage_a"], every=900)


class Reader:
    """Answers every meter at once; notes how many jobs were in flight per link at the same time."""

    def __init__(self) -> None:
        self.in_flight: Counter[str] = Counter()
        self.most: Counter[str] = Counter()

    async def read(self, bus, meter, items, *, plan, priority):
        self.in_flight[meter.link] += 1
        self.most[meter.link] = max(self.most[meter.link], self.in_flight[meter.link])
        await asyncio.sleep(0.001)
        self.in_flight[meter.link] -= 1
        return Outcome(meter.address, ok=True, readings=[Reading(meter.address, "voltage_a", 220.0, "V", 1.0, 1.0)])


class Journal:
    """Commits when told to: `futures` are the appends not yet committed."""

    def __init__(self, refuse: set[str] = frozenset()) -> None:
        self.futures: list[asyncio.Future[None]] = []
        self.refuse = refuse
        self.rounds: list[RoundStats] = []

    def append_nowait(self, readings: list[Reading]) -> asyncio.Future[None]:
        if readings[0].meter in self.refuse:
            raise BadReading("refused")
        future = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return future

    async def record_round(self, stats: RoundStats) -> None:
        self.rounds.append(stats)


class Observer:
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def round_started(self, stats: RoundStats) -> None: ...

    def outcome(self, round_id: str, outcome: Outcome, *, plan: str, link: str, area: str) -> None:
        self.outcomes.append(outcome)

    def round_finished(self, stats: RoundStats) -> None: ...


def scheduler(meters: list[MeterConfig], journal: Journal, reader: Reader | None = None,
              observer: Observer | None = None) -> Scheduler:
    buses = {m.link: object() for m in meters}
    return Scheduler([PLAN], {"p": meters}, bus_for=lambda m: buses[m.link], reader=reader or Reader(),  # type: ignore[arg-type, return-value]
                     journal=journal, observer=observer or Observer(), station="s", tz=TZ)


def fleet(links: int, per_link: int) -> list[MeterConfig]:
    return [MeterConfig(address=f"{n * 100 + i:012d}", link=f"l{n}") for n in range(links) for i in range(per_link)]


async def test_a_round_runs_a_few_lanes_per_bus_and_counts_a_meter_only_after_its_commit():
    journal, reader, observer = Journal(), Reader(), Observer()
    s = scheduler(fleet(3, 10), journal, reader, observer)
    round_ = asyncio.create_task(s.run_round(PLAN))
    while len(journal.futures) < 30:
        await asyncio.sleep(0.005)
    assert dict(reader.most) == {"l0": LANES_PER_BUS, "l1": LANES_PER_BUS, "l2": LANES_PER_BUS}
    assert observer.outcomes == [] and not round_.done()  # read, but nothing committed yet
    for future in journal.futures[:29]:
        future.set_result(None)
    await asyncio.sleep(0.01)
    assert len(observer.outcomes) == 29 and not round_.done()  # the round waits for its last commit
    journal.futures[29].set_result(None)
    stats = await asyncio.wait_for(round_, 5)
    assert (stats.expected, stats.collected, stats.failed) == (30, 30, {})
    assert journal.rounds == [stats]


async def test_a_refused_or_failed_append_is_that_meters_journal_failure():
    meters = fleet(1, 4)
    journal = Journal(refuse={meters[0].address})
    observer = Observer()
    round_ = asyncio.create_task(scheduler(meters, journal, observer=observer).run_round(PLAN))
    while len(journal.futures) < 3:
        await asyncio.sleep(0.005)
    journal.futures[0].set_exception(OSError("disk full"))
    for future in journal.futures[1:]:
        future.set_result(None)
    stats = await asyncio.wait_for(round_, 5)
    assert (stats.collected, stats.failed) == (2, {"journal_error": 2})
    failed = {o.meter: o.detail for o in observer.outcomes if not o.ok}
    assert failed == {meters[0].address: "refused", meters[1].address: "disk full"}


async def test_a_meter_whose_previous_job_is_still_committing_is_skipped_as_busy():
    meters = fleet(1, 2)
    journal = Journal()
    s = scheduler(meters, journal)
    first = asyncio.create_task(s.run_round(PLAN))
    while len(journal.futures) < 2:
        await asyncio.sleep(0.005)
    second = await asyncio.wait_for(s.run_round(PLAN), 5)  # the first round's commits are still open
    assert (second.collected, second.skipped, second.failed) == (0, 2, {"busy": 2})
    for future in journal.futures:
        future.set_result(None)
    assert (await asyncio.wait_for(first, 5)).collected == 2


@pytest.mark.parametrize("per_link", [1, 5])
async def test_every_meter_is_read_once_per_round(per_link):
    journal, reader, observer = Journal(), Reader(), Observer()
    meters = fleet(4, per_link)
    round_ = asyncio.create_task(scheduler(meters, journal, reader, observer).run_round(PLAN))
    while len(journal.futures) < len(meters):
        await asyncio.sleep(0.005)
    for future in journal.futures:
        future.set_result(None)
    await asyncio.wait_for(round_, 5)
    assert sorted(o.meter for o in observer.outcomes) == sorted(m.address for m in meters)
