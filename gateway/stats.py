"""Collection statistics: the one place that knows how collection is going.

The scheduler calls `round_started`, `outcome` (once per meter job) and `round_finished`; links call
`link_state`. `/metrics`, `/api/v1/status` and `meterd status` read `snapshot()` and the accessors.
Counts come from the outcomes; the caller's `RoundStats` is read (plan, id, start, expected, reread,
finished), never written, so a scheduler that counts into it for the journal is not double-counted.

"Today" is the local day (station timezone) of a *slot*: a main round plus the re-read rounds of its
plan that follow it. Within a slot a meter counts once: collected if any round of the slot collected
it, else failed with its latest reason. So a daily plan's success is distinct meters collected over
distinct meters expected; an interval plan's is meter-rounds collected over meter-rounds expected.
`BUSY` counts as failed (reason busy) and as skipped, not as the meter's failure (it was not asked).
Bounded: one small record per meter, 20 finished rounds per plan, two days of aggregates.
"""

from __future__ import annotations

import datetime as dt
import heapq
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from gateway.model import Outcome, Reason, RoundStats

OK = "ok"
DEGRADED = str(Reason.DEGRADED)
HISTORY = 20  # finished rounds kept per plan
MAX_RUNNING = 20  # running rounds per plan before the oldest is closed


def ratio(collected: int, expected: int) -> float | None:
    return round(collected / expected, 6) if expected else None


@dataclass(slots=True)
class Tally:
    """Expected / collected / failed-by-reason for one plan, area or link over a day."""

    expected: int = 0
    collected: int = 0
    failed: Counter[str] = field(default_factory=Counter)

    def add(self, result: str, n: int = 1) -> None:
        if result == OK:
            self.collected += n
        else:
            self.failed[result] += n

    def to_dict(self) -> dict[str, Any]:
        return {"expected": self.expected, "collected": self.collected, "failed": dict(+self.failed),
                "success_ratio": ratio(self.collected, self.expected)}


@dataclass(slots=True)
class Day:
    date: dt.date
    plans: dict[str, Tally] = field(default_factory=dict)
    areas: dict[str, Tally] = field(default_factory=dict)
    links: dict[str, Tally] = field(default_factory=dict)
    rounds: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        tallies = self.plans.values()
        total = Tally(sum(t.expected for t in tallies), sum(t.collected for t in tallies),
                      sum((t.failed for t in tallies), Counter()))
        return {"date": self.date.isoformat(), **total.to_dict(),
                "plans": {k: {**v.to_dict(), "rounds": self.rounds[k]} for k, v in sorted(self.plans.items())},
                "areas": {k: v.to_dict() for k, v in sorted(self.areas.items())},
                "links": {k: v.to_dict() for k, v in sorted(self.links.items())}}


@dataclass(slots=True)
class Slot:
    """A main round and its re-reads. The day's expected grows as meters are attempted (a running round
    does not drag the ratio down); when the main round ends, the meters it never reported are added."""

    seq: int
    plan: str
    main: str  # round id of the main round
    day: Day
    announced: int  # the main round's expected
    attempted: int = 0  # distinct meters with an outcome in this slot
    unreported: int = 0  # announced by the main round, no outcome yet, already in the day's expected


@dataclass(slots=True)
class Run:
    stats: RoundStats  # the caller's: read only
    slot: Slot
    collected: int = 0
    skipped: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    finished: float | None = None

    @property
    def done(self) -> int:
        return self.collected + sum(self.failed.values())


@dataclass(slots=True)
class MeterState:
    """What ops need to know about one meter; `slots` maps plan -> (slot seq, result, area, link)."""

    last_success: float | None = None
    last_failure: float | None = None
    consecutive: int = 0
    reason: Reason | None = None
    detail: str = ""
    cause: str = ""  # the last failure that was not a degraded skip ("reason: detail")
    link: str = ""
    area: str = ""
    slots: dict[str, tuple[int, str, str, str]] = field(default_factory=dict)


def round_dict(run: Run, now: float) -> dict[str, Any]:
    s = run.stats
    end = run.finished if run.finished is not None else now
    return {"round_id": s.round_id, "plan": s.plan, "reread": s.reread, "started": s.started,
            "finished": run.finished, "duration": round(max(0.0, end - s.started), 3), "expected": s.expected,
            "done": run.done, "collected": run.collected, "failed": dict(run.failed), "skipped": run.skipped,
            "success_ratio": ratio(run.collected, s.expected)}


class CollectionStats:
    def __init__(self, station: str, tz: ZoneInfo, *, clock: Callable[[], float] = time.time,
                 degraded_after: int = 3) -> None:
        self.station, self.tz, self.clock = station, tz, clock
        self.degraded_after = degraded_after  # consecutive failures that make a meter count as degraded
        self.started = clock()
        self.meters: dict[str, MeterState] = {}
        self.links: dict[str, dict[str, Any]] = {}  # link -> {"up", "since", "detail"}
        self.rounds_total: Counter[str] = Counter()
        self.outcomes_total: dict[str, Counter[str]] = {}  # plan -> ok|reason -> n
        self.orphan_outcomes = 0  # outcomes for a round nobody started
        self._days: dict[dt.date, Day] = {}
        self._slot_of_plan: dict[str, Slot] = {}
        self._running: dict[str, Run] = {}
        self._finished: dict[str, deque[Run]] = {}
        self._failing: set[str] = set()
        self._seq = 0

    def round_started(self, stats: RoundStats) -> None:
        slot = self._slot_of_plan.get(stats.plan)
        if stats.reread == 0 or slot is None:
            self._seq += 1
            slot = Slot(self._seq, stats.plan, stats.round_id, self._day(self.local_date(stats.started)),
                        stats.expected)
            slot.day.plans.setdefault(stats.plan, Tally())
            self._slot_of_plan[stats.plan] = slot
        slot.day.rounds[stats.plan] += 1
        running = [r for r in self._running.values() if r.stats.plan == stats.plan]
        if len(running) >= MAX_RUNNING:  # the scheduler lost track of a round: bound memory anyway
            self._close(running[0], None)
        self._running[stats.round_id] = Run(stats, slot)

    def outcome(self, round_id: str, outcome: Outcome, *, plan: str, link: str, area: str) -> None:
        result = OK if outcome.ok else str(outcome.reason or Reason.NO_REPLY)
        now = self.clock()
        totals = self.outcomes_total.get(plan)
        if totals is None:  # not setdefault: that would build a Counter per outcome
            totals = self.outcomes_total[plan] = Counter()
        totals[result] += 1
        m = self.meters.get(outcome.meter)
        if m is None:
            m = self.meters[outcome.meter] = MeterState()
        m.link, m.area = link, area
        if outcome.ok:
            m.last_success, m.consecutive = now, 0
            self._failing.discard(outcome.meter)
        elif outcome.reason is not Reason.BUSY:
            reason, detail = outcome.reason or Reason.NO_REPLY, outcome.detail
            if reason is not Reason.DEGRADED:
                m.cause = f"{reason}: {detail}"
            elif m.cause:  # skipped because of earlier failures: say which
                detail = f"{detail} (last failure {m.cause})"
            m.last_failure, m.reason, m.detail = now, reason, detail
            m.consecutive += 1
            self._failing.add(outcome.meter)
        run = self._running.get(round_id)
        if run is None:
            self.orphan_outcomes += 1
            return
        if outcome.ok:
            run.collected += 1
        else:
            run.failed[result] += 1
            run.skipped += outcome.reason is Reason.BUSY
        self._count_in_slot(run.slot, m, result, area, link)

    def round_finished(self, stats: RoundStats) -> None:
        run = self._running.get(stats.round_id)
        if run is not None:
            self._close(run, stats.finished)

    def link_state(self, link: str, up: bool, detail: str = "") -> None:
        st = self.links.get(link)
        since = st["since"] if st is not None and st["up"] == up else self.clock()
        self.links[link] = {"up": up, "since": since, "detail": detail}

    def forget(self, meter: str) -> None:  # the meter left the configuration (reload)
        self.meters.pop(meter, None)
        self._failing.discard(meter)

    def round_progress(self, round_id: str) -> tuple[int, int]:
        run = self._running.get(round_id) or next(
            (r for runs in self._finished.values() for r in runs if r.stats.round_id == round_id), None)
        if run is None:
            raise KeyError(f"no round {round_id!r}")
        return run.done, run.stats.expected

    def local_date(self, t: float) -> dt.date:
        return dt.datetime.fromtimestamp(t, self.tz).date()

    def today(self) -> Day:
        date = self.local_date(self.clock())
        return self._days.get(date) or Day(date)

    def links_up(self) -> int:
        return sum(bool(st["up"]) for st in self.links.values())

    def is_degraded(self, m: MeterState) -> bool:
        return m.consecutive >= self.degraded_after or (m.consecutive > 0 and m.reason is Reason.DEGRADED)

    def degraded_count(self) -> int:
        return sum(self.is_degraded(self.meters[k]) for k in self._failing if k in self.meters)

    def top_failing(self, n: int = 20) -> list[dict[str, Any]]:
        worst = heapq.nlargest(n, ((self.meters[k].consecutive, k) for k in self._failing if k in self.meters))
        return [{"meter": k, "consecutive_failures": m.consecutive, "reason": m.reason and str(m.reason),
                 "detail": m.detail, "last_failure": m.last_failure, "last_success": m.last_success,
                 "degraded": self.is_degraded(m), "link": m.link, "area": m.area}
                for k, m in ((k, self.meters[k]) for _, k in worst)]

    def plans(self) -> list[str]:
        return sorted({*self._finished, *(r.stats.plan for r in self._running.values()), *self.today().plans})

    def snapshot(self, top: int = 20) -> dict[str, Any]:
        now = self.clock()
        today = self.today()
        yesterday = self._days.get(today.date - dt.timedelta(days=1))
        plans = {}
        for plan in self.plans():
            history = [round_dict(r, now) for r in reversed(self._finished.get(plan, ()))]
            plans[plan] = {"running": [round_dict(r, now) for r in self._running.values() if r.stats.plan == plan],
                           "last": history[0] if history else None, "history": history,
                           "rounds_total": self.rounds_total[plan]}
        return {
            "station": self.station, "timezone": str(self.tz), "now": now, "started": self.started,
            "uptime": round(now - self.started, 3),
            "today": today.to_dict(), "yesterday": yesterday.to_dict() if yesterday else None,
            "plans": plans,
            "links": {k: dict(v) for k, v in sorted(self.links.items())},
            "meters": {"known": len(self.meters), "failing": len(self._failing),
                       "degraded": self.degraded_count(), "top_failing": self.top_failing(top)},
            "outcomes_total": {p: dict(sorted(c.items())) for p, c in sorted(self.outcomes_total.items())},
            "orphan_outcomes": self.orphan_outcomes,
        }

    def _day(self, date: dt.date) -> Day:
        day = self._days.get(date)
        if day is None:
            day = self._days[date] = Day(date)
            for old in sorted(self._days)[:-2]:  # keep the two latest days
                del self._days[old]
        return day

    def _close(self, run: Run, finished: float | None) -> None:
        s = run.stats
        run.finished = finished if finished is not None else self.clock()
        slot = run.slot
        if s.round_id == slot.main and slot.attempted < slot.announced:
            slot.unreported = slot.announced - slot.attempted
            slot.day.plans[slot.plan].expected += slot.unreported
        self._running.pop(s.round_id, None)
        self.rounds_total[s.plan] += 1
        self._finished.setdefault(s.plan, deque(maxlen=HISTORY)).append(run)

    def _count_in_slot(self, slot: Slot, m: MeterState, result: str, area: str, link: str) -> None:
        day = slot.day
        prev = m.slots.get(slot.plan)
        if prev is not None and prev[0] == slot.seq:
            _, prev_result, prev_area, prev_link = prev
            if prev_result == OK:
                return  # already collected in this slot: a later failure does not undo it
            if result == DEGRADED and prev_result != DEGRADED:
                return  # skipped for the failures before: the day keeps their reason, the root cause
            day.plans[slot.plan].add(prev_result, -1)
            for tally in (day.areas[prev_area], day.links[prev_link]):
                tally.add(prev_result, -1)
                tally.expected -= 1
        else:
            slot.attempted += 1
            if slot.unreported:
                slot.unreported -= 1
            else:
                day.plans[slot.plan].expected += 1
        day.plans[slot.plan].add(result)
        for tallies, key in ((day.areas, area), (day.links, link)):
            found = tallies.get(key)
            if found is None:
                found = tallies[key] = Tally()
            found.expected += 1
            found.add(result)
        m.slots[slot.plan] = (slot.seq, result, area, link)
