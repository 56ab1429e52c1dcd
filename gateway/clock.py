"""Meter clocks: the daily broadcast time sync and the clock-drift check.

A wrong meter clock is a top cause of bad daily data (the freeze happens at the
meter's midnight, not ours), so `[time_sync]` does two things:

* at `at` (daily, station time) every bus gets one broadcast time sync (08 to
  999999999999, no reply), at re-read priority. The frame is sent on a second
  boundary and carries that second, so an idle line sets the meters to within a
  few milliseconds; the line then stays quiet for 500 ms (meters are busy, §6).
  A sync that waited in the bus queue for more than a second is sent again with
  a fresh time. Meters that were off are checked again a minute later.
* each meter's clock is read (`date`, then `time`; 1997: C010/C011) at most
  every `check_every`, at background priority (behind every poll). drift = meter clock - station clock
  at the moment the meter read it: the middle of the `time` transaction (capped
  at the first-byte timeout, in case the job waited in the queue), plus half a
  second because a meter shows the second it is in. Meters whose |drift| is
  above `drift_threshold` are offenders: one WARNING when a meter crosses the
  threshold, one INFO when it is back.

`ClockWatch.status()` is the "clock" section of `/api/v1/status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any
from zoneinfo import ZoneInfo

from gateway.archive import MeterConfig
from gateway.bus import Bus, BusError, Priority, Timing
from gateway.config import Config
from protocols.dlt645 import BROADCAST, DecodeError, broadcast_time_request, decode, find, read_request

log = logging.getLogger(__name__)

TICK = 30.0  # s between looks for meters due a check (and for a changed [time_sync])
VERIFY_AFTER = 60.0  # s after a sync, meters that were off are read again
RETRY_FAILED = 3600.0  # s before a meter whose clock could not be read is tried again (at most check_every)
BROADCAST_QUIET = 0.5  # s of silence after a broadcast: meters may be busy (dlt645.md §6)
STALE = 1.0  # s a sync may wait in the queue before its time is too old to keep
MIDNIGHT_GUARD = dt.time(0, 1)  # a time read before this re-reads the date (the day may have turned)
SHOWN = 20  # offenders and unreadable meters listed in the status


class ClockError(Exception):
    """The meter's clock could not be read (abnormal reply, nonsense value)."""


@dataclasses.dataclass(slots=True)
class Drift:
    drift: float  # s, meter clock - station clock
    checked: float  # station time of the check (UTC s)
    meter_clock: str  # what the meter showed, ISO


def next_daily(at: dt.time, now: float, tz: ZoneInfo) -> float:
    """The next local `at` strictly after `now` (UTC seconds)."""
    local = dt.datetime.fromtimestamp(now, tz)
    candidate = dt.datetime.combine(local.date(), at, tzinfo=tz)
    if candidate.timestamp() <= now:
        candidate = dt.datetime.combine(local.date() + dt.timedelta(days=1), at, tzinfo=tz)
    return candidate.timestamp()


class ClockWatch:
    """Broadcast sync and drift check for the meters of the running config (reloads are picked up)."""

    def __init__(self, config: Callable[[], Config], bus_for: Callable[[MeterConfig], Bus | None],
                 timing_for: Callable[[MeterConfig], Timing], *, clock: Callable[[], float] = time.time,
                 priority: Priority = Priority.BACKGROUND, tick: float = TICK,
                 verify_after: float = VERIFY_AFTER) -> None:
        self.config = config
        self.bus_for = bus_for
        self.timing_for = timing_for
        self.clock = clock
        self.priority = priority  # of the clock reads; the broadcast is always REREAD
        self.tick = tick
        self.verify_after = verify_after
        self.stats: Counter[str] = Counter()
        self.last_sync: float | None = None
        self.last_sync_result: dict[str, str] = {}
        self._drifts: dict[str, Drift] = {}
        self._unreadable: dict[str, str] = {}  # address -> why its last check failed
        self._due: dict[str, float] = {}  # address -> when it is checked next
        self._warned: set[str] = set()

    # --- what ops sees ---------------------------------------------------------------------------
    def drifts(self) -> dict[str, float]:
        return {address: d.drift for address, d in self._drifts.items()}

    def offenders(self) -> list[tuple[str, float]]:
        """(address, drift) of the meters off by more than the threshold, the worst first."""
        limit = self.config().time_sync.drift_threshold
        off = [(a, d.drift) for a, d in self._drifts.items() if abs(d.drift) > limit]
        return sorted(off, key=lambda pair: -abs(pair[1]))

    def status(self) -> dict[str, Any]:
        settings = self.config().time_sync
        offenders = self.offenders()
        return {
            "sync_at": settings.at.isoformat("minutes") if settings.at else None,
            "last_sync": self.last_sync, "last_sync_buses": dict(self.last_sync_result),
            "drift_threshold": settings.drift_threshold, "check_every": settings.check_every,
            "checked": len(self._drifts), "offenders": len(offenders),
            "worst": [{"meter": a, "drift": round(d, 1), "checked": self._drifts[a].checked,
                       "meter_clock": self._drifts[a].meter_clock} for a, d in offenders[:SHOWN]],
            "unreadable": len(self._unreadable), "unreadable_meters": dict(list(self._unreadable.items())[:SHOWN]),
            "counters": dict(self.stats),
        }

    # --- the task --------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self._sync_loop(stop), name="clock-sync"),
                 asyncio.create_task(self._check_loop(stop), name="clock-check")]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _sync_loop(self, stop: asyncio.Event) -> None:
        planned: tuple[dt.time, str, float] | None = None  # (at, tz, when)
        while not stop.is_set():
            config = self.config()
            at, now = config.time_sync.at, self.clock()
            if at is None:
                planned = None
            elif planned is None or planned[:2] != (at, config.station.timezone):
                planned = (at, config.station.timezone, next_daily(at, now, config.tz))
            elif now >= planned[2]:
                try:
                    await self.sync()
                except Exception:  # never let one bad night end the daily sync
                    self.stats["sync_errors"] += 1
                    log.exception("time sync failed")
                planned = None
                continue
            wait = self.tick if planned is None else min(self.tick, max(0.0, planned[2] - now))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    async def _check_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.check_due()
            except Exception:  # a bug must not end the checks for good
                self.stats["check_errors"] += 1
                log.exception("clock check failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.tick)

    # --- broadcast sync --------------------------------------------------------------------------
    def _buses(self, meters: Sequence[MeterConfig]) -> dict[int, tuple[Bus, list[MeterConfig]]]:
        buses: dict[int, tuple[Bus, list[MeterConfig]]] = {}
        for meter in meters:
            bus = self.bus_for(meter)
            if bus is not None:
                buses.setdefault(id(bus), (bus, []))[1].append(meter)
        return buses

    async def sync(self) -> dict[str, str]:
        """One broadcast time sync on every bus that has meters; bus name -> "ok" or why not."""
        config = self.config()
        buses = [bus for bus, _ in self._buses(config.meters).values()]
        results = await asyncio.gather(*(self._sync_bus(bus, config.tz) for bus in buses))
        self.last_sync = self.clock()
        self.last_sync_result = {bus.name: result for bus, result in zip(buses, results, strict=True)}
        ok = sum(1 for r in results if r == "ok")
        level = logging.INFO if ok == len(buses) else logging.WARNING
        log.log(level, "time sync broadcast on %d of %d buses%s", ok, len(buses),
                "" if ok == len(buses) else f": {self.last_sync_result}")
        limit = config.time_sync.drift_threshold
        for address, drift in self._drifts.items():  # did it take? read those again soon
            if abs(drift.drift) > limit:
                self._due[address] = min(self._due.get(address, math.inf), self.last_sync + self.verify_after)
        return self.last_sync_result

    async def _sync_bus(self, bus: Bus, tz: ZoneInfo) -> str:
        timing = dataclasses.replace(bus.timing, gap=max(bus.timing.gap, BROADCAST_QUIET), retries=0)
        size = len(broadcast_time_request(dt.datetime(2000, 1, 1))) + timing.preamble
        on_wire = bus.link.tx_time(size)
        for attempt in range(2):
            now = self.clock()
            second = math.ceil(now + on_wire)  # the frame arrives when this second starts
            await asyncio.sleep(max(0.0, second - on_wire - now))
            request = broadcast_time_request(dt.datetime.fromtimestamp(second, tz).replace(tzinfo=None))
            queued = time.monotonic()
            try:
                await bus.transact(request, BROADCAST, priority=Priority.REREAD, timing=timing, broadcast=True)
            except BusError as exc:
                self.stats["sync_failed"] += 1
                return f"{exc.reason}: {exc}"
            waited = time.monotonic() - queued - timing.gap - on_wire
            if waited <= STALE:
                self.stats["syncs"] += 1
                return "ok"
            self.stats["sync_stale"] += 1
            log.debug("bus %s: time sync waited %.1f s in the queue (attempt %d)", bus.name, waited, attempt + 1)
        return "ok (queued behind other jobs: up to a few seconds off)"

    # --- drift check -----------------------------------------------------------------------------
    async def check_due(self) -> int:
        """Check every meter whose check is due, one at a time per bus, buses in parallel; how many."""
        config = self.config()
        if config.time_sync.check_every is None:
            return 0
        now = self.clock()
        known = {m.address for m in config.meters}
        for table in (self._drifts, self._unreadable, self._due):
            for address in [a for a in table if a not in known]:
                del table[address]
        self._warned &= known
        due = [m for m in config.meters if self._due.get(m.address, 0.0) <= now]
        groups = self._buses(due).values()
        counts = await asyncio.gather(*(self._check_bus(bus, meters) for bus, meters in groups))
        return sum(counts)

    async def _check_bus(self, bus: Bus, meters: list[MeterConfig]) -> int:
        checked = 0
        for meter in meters:
            if not bus.link.up:  # a housekeeping read must not hold the bus through a reconnect: next pass
                break
            await self.check(meter, bus)
            checked += 1
        return checked

    async def check(self, meter: MeterConfig, bus: Bus | None = None) -> float | None:
        """Read one meter's clock now; its drift in seconds, or None when it could not be read."""
        config = self.config()
        settings = config.time_sync
        bus = bus or self.bus_for(meter)
        try:
            if bus is None:
                raise ClockError(f"no bus for link {meter.link}")
            drift, shown = await self._measure(bus, meter, config.tz)
        except (BusError, ClockError) as exc:
            self.stats["checks_failed"] += 1
            self._unreadable[meter.address] = f"{getattr(exc, 'reason', 'bad_clock')}: {exc}"
            self._due[meter.address] = self.clock() + min(settings.check_every or RETRY_FAILED, RETRY_FAILED)
            return None
        now = self.clock()
        self.stats["checks"] += 1
        self._unreadable.pop(meter.address, None)
        self._drifts[meter.address] = Drift(drift, now, shown)
        self._due[meter.address] = now + (settings.check_every or RETRY_FAILED)
        off = abs(drift) > settings.drift_threshold
        if off and meter.address not in self._warned:
            self._warned.add(meter.address)
            log.warning("meter %s: clock is %+.0f s off (threshold %g s; meter shows %s)", meter.address, drift,
                        settings.drift_threshold, shown)
        elif not off and meter.address in self._warned:
            self._warned.discard(meter.address)
            log.info("meter %s: clock back within %g s (%+.1f s)", meter.address, settings.drift_threshold, drift)
        return drift

    async def _measure(self, bus: Bus, meter: MeterConfig, tz: ZoneInfo) -> tuple[float, str]:
        timing = self.timing_for(meter)
        day, _, _ = await self._read(bus, meter, "date", timing)
        tod, started, ended = await self._read(bus, meter, "time", timing)
        if not isinstance(day, dt.date) or not isinstance(tod, dt.time):
            raise ClockError(f"meter shows no valid clock (date {day!r}, time {tod!r})")
        if tod < MIDNIGHT_GUARD:  # the day may have turned between the two reads
            day, _, _ = await self._read(bus, meter, "date", timing)
            if not isinstance(day, dt.date):
                raise ClockError(f"meter shows no valid date ({day!r})")
        shown = dt.datetime.combine(day, tod)
        exchange = min(max(0.0, ended - started - timing.gap), timing.first_byte)
        sampled = ended - timing.gap - exchange / 2
        return shown.replace(tzinfo=tz).timestamp() + 0.5 - sampled, shown.isoformat()

    async def _read(self, bus: Bus, meter: MeterConfig, name: str, timing: Timing) -> tuple[Any, float, float]:
        """One read of a one-value item: (value, station time before, station time after)."""
        item = find(name, meter.edition)
        request = read_request(meter.address, item.di, meter.edition)
        started = self.clock()
        frame = await bus.transact(request, meter.address, priority=self.priority, timing=timing)
        ended = self.clock()
        if frame is None:
            raise ClockError("no reply frame")
        try:
            reply = decode(frame, meter.edition)
        except DecodeError as exc:
            raise ClockError(f"undecodable {name} reply: {exc}") from None
        if reply.error is not None or reply.di != item.di or not reply.values:
            raise ClockError(f"abnormal reply to the {name} read (error {reply.error!r})")
        return next(iter(reply.values.values())).value, started, ended
