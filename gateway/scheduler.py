"""Rounds: one run of a plan over its meters, and the re-read rounds (补抄) of daily plans.

A meter's job never overlaps its previous job of the same plan (the skip is
counted as `busy`). A round works through each bus's meters in a few lanes
rather than with a task per meter: the bus serialises them anyway. A reading
counts as collected only after the journal committed it. Re-read rounds go
ahead of routine polls on each bus and only ask the meters that have not
been collected yet for that plan's day.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Protocol
from zoneinfo import ZoneInfo

from gateway.archive import MeterConfig
from gateway.bus import Bus, Priority
from gateway.model import Outcome, Reading, Reason, RoundStats
from gateway.plans import PlanConfig, day_of, next_run
from gateway.reader import Reader

log = logging.getLogger(__name__)
# A round runs this many jobs at a time per bus (the bus does one transaction at a time anyway): two
# keep the next request queued when a reply comes in, without a task per meter (10,000 per round).
LANES_PER_BUS = 2


class Journal(Protocol):
    def append_nowait(self, readings: list[Reading]) -> asyncio.Future[None]: ...

    async def record_round(self, stats: RoundStats) -> None: ...


class Observer(Protocol):
    def round_started(self, stats: RoundStats) -> None: ...

    def outcome(self, round_id: str, outcome: Outcome, *, plan: str, link: str, area: str) -> None: ...

    def round_finished(self, stats: RoundStats) -> None: ...


class Scheduler:
    def __init__(self, plans: list[PlanConfig], meters: dict[str, list[MeterConfig]], *,
                 bus_for: Callable[[MeterConfig], Bus | None], reader: Reader, journal: Journal,
                 observer: Observer, station: str, tz: ZoneInfo, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.plans = plans
        self.meters = meters  # plan name -> its meters
        self.bus_for = bus_for
        self.reader = reader
        self.journal = journal
        self.observer = observer
        self.station = station
        self.tz = tz
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311  (jitter spreads load; nothing secret)
        self._running: set[tuple[str, str]] = set()  # (plan, meter) jobs in flight
        self._collected_day: dict[str, tuple[object, set[str]]] = {}  # plan -> (day, meters collected)
        self._rounds: set[asyncio.Task[RoundStats]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """One timer per plan until stop; rounds already running finish on their own (or are cancelled)."""
        timers = [asyncio.create_task(self._plan_loop(plan, stop), name=f"plan-{plan.name}") for plan in self.plans]
        try:
            await stop.wait()
        finally:
            for task in timers + list(self._rounds):
                task.cancel()
            await asyncio.gather(*timers, *self._rounds, return_exceptions=True)

    async def _plan_loop(self, plan: PlanConfig, stop: asyncio.Event) -> None:
        last = 0.0
        while not stop.is_set():
            # max(): a clock stepped back (NTP on a box without RTC) must not run the same slot twice
            base = next_run(plan, max(self.clock(), last), self.tz)
            last = base
            due = base + self.rng.uniform(0, plan.jitter)
            if await self._stopped_before(due, stop):
                return
            task = asyncio.create_task(self.daily_cycle(plan, due) if plan.daily else self.run_round(plan))
            self._rounds.add(task)
            task.add_done_callback(self._round_done)

    async def _stopped_before(self, due: float, stop: asyncio.Event) -> bool:
        """Wait until the wall clock reaches `due`; True if stopped first. The loop's timers run on the
        monotonic clock (uvloop's in whole milliseconds) and may fire a hair early by the wall clock:
        a round must never start before its mark, so wait out the rest."""
        while (left := due - self.clock()) > 0:
            try:
                await asyncio.wait_for(stop.wait(), left)
                return True
            except TimeoutError:
                pass
        return stop.is_set()

    def _round_done(self, task: asyncio.Task[RoundStats]) -> None:
        self._rounds.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("round failed: %s", task.exception(), exc_info=task.exception())

    async def daily_cycle(self, plan: PlanConfig, started: float) -> RoundStats:
        """The main round, then re-read rounds at their offsets for whoever is still missing."""
        stats = await self.run_round(plan)
        for n, offset in enumerate(plan.rereads, start=1):
            missing = self.missing(plan)
            if not missing:
                break
            await asyncio.sleep(max(0.0, started + offset - self.clock()))
            stats = await self.run_round(plan, only=self.missing(plan), reread=n)
        return stats

    def collected_today(self, plan: PlanConfig) -> set[str]:
        day = day_of(self.clock(), self.tz)
        seen_day, meters = self._collected_day.get(plan.name, (None, set()))
        if seen_day != day:
            meters = set()
            self._collected_day[plan.name] = (day, meters)
        return meters

    def missing(self, plan: PlanConfig) -> list[MeterConfig]:
        done = self.collected_today(plan)
        return [m for m in self.meters.get(plan.name, []) if m.address not in done]

    async def run_round(self, plan: PlanConfig, *, only: list[MeterConfig] | None = None,
                        reread: int = 0) -> RoundStats:
        meters = self.meters.get(plan.name, []) if only is None else only
        stats = RoundStats(plan.name, uuid.uuid4().hex[:12], self.clock(), self.station, expected=len(meters),
                           reread=reread)
        self.observer.round_started(stats)
        priority = Priority.REREAD if reread else Priority.ROUTINE
        queues: dict[int, deque[MeterConfig]] = {}  # per bus (by identity), in the plan's order
        for meter in meters:
            queues.setdefault(id(self.bus_for(meter)), deque()).append(meter)
        commits = _Commits()
        await asyncio.gather(*[self._lane(plan, queue, stats, priority, commits)
                               for queue in queues.values() for _ in range(min(LANES_PER_BUS, len(queue)))])
        await commits.wait()
        stats.finished = self.clock()
        await self.journal.record_round(stats)
        self.observer.round_finished(stats)
        level = logging.INFO if stats.collected == stats.expected else logging.WARNING
        log.log(level, "round %s%s: %d/%d collected in %.1f s%s", plan.name, f" re-read {reread}" if reread else "",
                stats.collected, stats.expected, stats.finished - stats.started,
                f" (failed: {stats.failed})" if stats.failed else "")
        return stats

    async def _lane(self, plan: PlanConfig, queue: deque[MeterConfig], stats: RoundStats,
                    priority: Priority, commits: _Commits) -> None:
        while queue:
            await self._job(plan, queue.popleft(), stats, priority, commits)

    async def _job(self, plan: PlanConfig, meter: MeterConfig, stats: RoundStats, priority: Priority,
                   commits: _Commits) -> None:
        """Read the meter; the lane goes on to the next meter while the journal commits this one's
        readings (a group commit takes up to its window), and the outcome counts once committed."""
        key = (plan.name, meter.address)
        bus = self.bus_for(meter)
        if key in self._running:
            stats.skipped += 1
            self._account(plan, meter, stats, Outcome(meter.address, ok=False, reason=Reason.BUSY,
                                                      detail="previous job still running"))
            return
        if bus is None:
            self._account(plan, meter, stats, Outcome(meter.address, ok=False, reason=Reason.LINK_DOWN,
                                                      detail=f"no link {meter.link}"))
            return
        self._running.add(key)
        try:
            outcome = await self.reader.read(bus, meter, plan.items, plan=plan.name, priority=priority)
        except BaseException:
            self._running.discard(key)
            raise
        if outcome.readings:
            try:
                committed = self.journal.append_nowait(outcome.readings)  # collected only once it is durable
            except Exception as exc:  # the journal refused them (BadReading, closed): this job's failure
                outcome.ok, outcome.reason, outcome.detail = False, Reason.JOURNAL, str(exc)
            else:
                commits.open += 1
                committed.add_done_callback(lambda done: self._committed(
                    done, plan=plan, meter=meter, stats=stats, outcome=outcome, commits=commits))
                return
        self._running.discard(key)
        self._account(plan, meter, stats, outcome)

    def _committed(self, done: asyncio.Future[None], *, plan: PlanConfig, meter: MeterConfig, stats: RoundStats,
                   outcome: Outcome, commits: _Commits) -> None:
        self._running.discard((plan.name, meter.address))
        error = done.exception() if not done.cancelled() else asyncio.CancelledError("journal append cancelled")
        if error is not None:  # the journal's failure is this job's failure
            outcome.ok, outcome.reason, outcome.detail = False, Reason.JOURNAL, str(error)
        self._account(plan, meter, stats, outcome)
        commits.closed()

    def _account(self, plan: PlanConfig, meter: MeterConfig, stats: RoundStats, outcome: Outcome) -> None:
        if outcome.ok:
            stats.collected += 1
            if plan.daily:
                self.collected_today(plan).add(meter.address)
        else:
            reason = str(outcome.reason or Reason.NO_REPLY)
            stats.failed[reason] = stats.failed.get(reason, 0) + 1
        self.observer.outcome(stats.round_id, outcome, plan=plan.name, link=meter.link, area=meter.area)


class _Commits:
    """A round's journal appends still waiting for their commit: the round ends after the last one."""

    def __init__(self) -> None:
        self.open = 0
        self._idle: asyncio.Future[None] | None = None

    def closed(self) -> None:
        self.open -= 1
        if self.open == 0 and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def wait(self) -> None:
        if self.open:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle
