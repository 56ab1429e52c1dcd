"""CollectionStats: a station's day of rounds, re-reads counted once per meter, local-midnight rollover."""

from __future__ import annotations

import datetime as dt
import json
from zoneinfo import ZoneInfo

import pytest

from gateway.model import Outcome, Reason, RoundStats
from gateway.stats import HISTORY, CollectionStats

TZ = ZoneInfo("Asia/Shanghai")
METERS = [f"0000000000{i:02d}" for i in range(1, 11)]  # 1-5 north/bus1, 6-10 south/bus2


def at(day: int, hour: int, minute: int = 0, second: int = 0) -> float:
    return dt.datetime(2024, 5, day, hour, minute, second, tzinfo=TZ).timestamp()


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def where(meter: str) -> dict[str, str]:
    north = METERS.index(meter) < 5
    return {"area": "north" if north else "south", "link": "bus1" if north else "bus2"}


def run_round(stats: CollectionStats, clock: Clock, plan: str, round_id: str, results: dict[str, Reason | None],
              *, reread: int = 0, seconds: float = 30.0) -> RoundStats:
    rs = RoundStats(plan=plan, round_id=round_id, started=clock.t, expected=len(results), reread=reread)
    stats.round_started(rs)
    for meter, reason in results.items():
        clock.t += seconds / len(results)
        ok = reason is None
        stats.outcome(round_id, Outcome(meter, ok=ok, reason=reason, detail="" if ok else f"{reason} detail"),
                      plan=plan, **where(meter))
    rs.finished = clock.t
    stats.round_finished(rs)
    return rs


def m(i: int) -> str:
    return METERS[i - 1]


DayOfRounds = tuple[CollectionStats, Clock, list[RoundStats]]


@pytest.fixture
def day_of_rounds() -> DayOfRounds:
    clock = Clock(at(1, 0, 10))
    stats = CollectionStats("st-01", TZ, clock=clock, degraded_after=2)
    main = {m(i): None for i in range(1, 7)} | {m(7): Reason.NO_REPLY, m(8): Reason.NO_REPLY,
                                                m(9): Reason.BAD_FRAME, m(10): Reason.BUSY}
    r1 = run_round(stats, clock, "daily", "daily-1", main)
    clock.t = at(1, 0, 30)
    r2 = run_round(stats, clock, "daily", "daily-1-r1", {m(7): None, m(8): Reason.NO_REPLY, m(9): None,
                                                          m(10): Reason.ABNORMAL_REPLY}, reread=1)
    clock.t = at(1, 1, 10)
    # meter 7 again (collected twice in the slot) must still count once
    r3 = run_round(stats, clock, "daily", "daily-1-r2", {m(8): None, m(10): Reason.LINK_DOWN, m(7): None}, reread=2)
    clock.t = at(1, 8, 0)
    # the quarter-hour plan reads meters 1-9 (meter 10 is daily only)
    q1 = run_round(stats, clock, "quarter", "q-1", {mm: (Reason.NO_REPLY if mm == m(1) else None) for mm in METERS[:9]})
    clock.t = at(1, 8, 15)
    q2 = run_round(stats, clock, "quarter", "q-2", dict.fromkeys(METERS[:9]))
    return stats, clock, [r1, r2, r3, q1, q2]


def test_each_round_counts_its_own_outcomes(day_of_rounds: DayOfRounds) -> None:
    stats, _, (r1, *_) = day_of_rounds
    history = {r["round_id"]: r for p in stats.snapshot()["plans"].values() for r in p["history"]}
    one = history["daily-1"]
    assert (one["collected"], one["failed"], one["skipped"]) == (6, {"no_reply": 2, "bad_frame": 1, "busy": 1}, 1)
    assert one["collected"] + sum(one["failed"].values()) == one["expected"] == one["done"] == 10
    assert one["success_ratio"] == 0.6 and one["reread"] == 0
    assert (history["daily-1-r1"]["collected"], history["daily-1-r1"]["failed"]) == (
        2, {"no_reply": 1, "abnormal_reply": 1})
    assert (history["daily-1-r2"]["collected"], history["daily-1-r2"]["failed"]) == (2, {"link_down": 1})
    assert history["q-1"]["success_ratio"] == pytest.approx(8 / 9, abs=1e-6)
    # the scheduler's own RoundStats is read, never written (it counts into it itself)
    assert (r1.collected, r1.failed, r1.skipped) == (0, {}, 0)
    last = stats.snapshot()["plans"]["daily"]["last"]
    assert last["round_id"] == "daily-1-r2" and last["duration"] == pytest.approx(30.0)
    assert stats.round_progress("daily-1") == (10, 10)


def test_today_counts_distinct_meters_across_reread_rounds(day_of_rounds: DayOfRounds) -> None:
    stats, _, _ = day_of_rounds
    today = stats.snapshot()["today"]
    daily = today["plans"]["daily"]
    # 9 distinct meters collected (7 twice), meter 10 failed with its latest reason only
    assert (daily["expected"], daily["collected"], daily["failed"]) == (10, 9, {"link_down": 1})
    assert daily["success_ratio"] == 0.9 and daily["rounds"] == 3
    quarter = today["plans"]["quarter"]
    assert (quarter["expected"], quarter["collected"], quarter["failed"]) == (18, 17, {"no_reply": 1})
    assert (today["expected"], today["collected"], today["failed"]) == (28, 26, {"link_down": 1, "no_reply": 1})
    assert today["success_ratio"] == pytest.approx(26 / 28, abs=1e-6)
    # failure reasons add up everywhere: collected + failed == expected
    for group in ("plans", "areas", "links"):
        for name, tally in today[group].items():
            assert tally["collected"] + sum(tally["failed"].values()) == tally["expected"], (group, name)
    assert today["areas"]["north"] == {"expected": 15, "collected": 14, "failed": {"no_reply": 1},
                                       "success_ratio": pytest.approx(14 / 15, abs=1e-6)}
    assert today["areas"]["south"]["expected"] == 13 and today["areas"]["south"]["collected"] == 12
    assert today["links"]["bus2"]["failed"] == {"link_down": 1}
    assert today["date"] == "2024-05-01"


def test_per_meter_state_and_top_failing(day_of_rounds: DayOfRounds) -> None:
    stats, _, _ = day_of_rounds
    snap = stats.snapshot()
    assert snap["meters"]["known"] == 10
    assert snap["meters"]["failing"] == 1 and snap["meters"]["degraded"] == 1
    [worst] = snap["meters"]["top_failing"]
    assert worst["meter"] == m(10)
    assert worst["consecutive_failures"] == 2  # busy does not count as the meter's failure
    assert (worst["reason"], worst["detail"], worst["link"], worst["area"]) == (
        "link_down", "link_down detail", "bus2", "south")
    assert worst["last_success"] is None and worst["degraded"] is True
    assert stats.meters[m(1)].consecutive == 0  # failed in q-1, collected in q-2
    assert stats.meters[m(8)].consecutive == 0 and stats.meters[m(8)].last_success is not None
    assert snap["outcomes_total"]["daily"] == {"ok": 10, "no_reply": 3, "bad_frame": 1, "busy": 1,
                                               "abnormal_reply": 1, "link_down": 1}
    json.dumps(snap)  # JSON-able as it is


def test_rollover_at_local_midnight(day_of_rounds: DayOfRounds) -> None:
    stats, clock, _ = day_of_rounds
    clock.t = at(1, 23, 59, 59)
    assert stats.snapshot()["today"]["date"] == "2024-05-01"
    # a round started before midnight belongs to that day, even if its re-read runs after midnight
    run_round(stats, clock, "late", "late-1", {m(1): Reason.NO_REPLY, m(2): None}, seconds=1)
    clock.t = at(2, 0, 0, 1)
    run_round(stats, clock, "late", "late-1-r1", {m(1): None}, reread=1)
    snap = stats.snapshot()
    assert snap["today"]["date"] == "2024-05-02"
    assert snap["today"]["plans"] == {} and snap["today"]["success_ratio"] is None
    assert snap["yesterday"]["plans"]["late"]["collected"] == 2
    assert snap["yesterday"]["plans"]["daily"]["success_ratio"] == 0.9
    # the new day's daily round is a new slot: meters count again
    clock.t = at(2, 0, 10)
    run_round(stats, clock, "daily", "daily-2", dict.fromkeys(METERS))
    today = stats.snapshot()["today"]
    assert today["plans"]["daily"] == {"expected": 10, "collected": 10, "failed": {}, "success_ratio": 1.0,
                                       "rounds": 1}
    # two days are kept, not more
    clock.t = at(3, 0, 10)
    run_round(stats, clock, "daily", "daily-3", dict.fromkeys(METERS))
    assert len(stats._days) == 2


def test_running_round_progress_links_and_bounds() -> None:
    clock = Clock(at(1, 12))
    stats = CollectionStats("st-01", TZ, clock=clock)
    rs = RoundStats(plan="p", round_id="p-1", started=clock.t, expected=4)
    stats.round_started(rs)
    stats.outcome("p-1", Outcome(m(1), ok=True), plan="p", link="bus1", area="a")
    stats.outcome("p-1", Outcome(m(2), ok=False, reason=Reason.NO_REPLY), plan="p", link="bus1", area="a")
    clock.t += 5
    assert stats.round_progress("p-1") == (2, 4)
    running = stats.snapshot()["plans"]["p"]["running"]
    assert [(r["round_id"], r["done"], r["duration"]) for r in running] == [("p-1", 2, 5.0)]
    with pytest.raises(KeyError):
        stats.round_progress("nope")
    stats.outcome("ghost", Outcome(m(3), ok=True), plan="p", link="bus1", area="a")
    assert stats.orphan_outcomes == 1 and stats.meters[m(3)].last_success == clock.t

    stats.link_state("bus1", True)
    clock.t += 10
    stats.link_state("bus1", True, "connected to 10.0.0.7:4001")  # detail only: since unchanged
    stats.link_state("bus2", False, "connection refused")
    assert stats.links_up() == 1
    links = stats.snapshot()["links"]
    assert links["bus1"] == {"up": True, "since": at(1, 12) + 5, "detail": "connected to 10.0.0.7:4001"}
    assert links["bus2"]["up"] is False

    for i in range(HISTORY + 5):
        run_round(stats, clock, "p", f"p-{i + 2}", {m(1): None})
    assert len(stats.snapshot()["plans"]["p"]["history"]) == HISTORY
    stats.forget(m(2))
    assert m(2) not in stats.meters and stats.snapshot()["meters"]["failing"] == 0


def test_running_round_counts_what_it_reached_and_unreported_meters_count_at_the_end() -> None:
    clock = Clock(at(1, 0, 10))
    stats = CollectionStats("st-01", TZ, clock=clock)
    main = RoundStats(plan="daily", round_id="d-1", started=clock.t, expected=4)
    stats.round_started(main)
    stats.outcome("d-1", Outcome(m(1), ok=True), plan="daily", link="bus1", area="a")
    stats.outcome("d-1", Outcome(m(2), ok=True), plan="daily", link="bus1", area="a")
    plan = stats.snapshot()["today"]["plans"]["daily"]
    assert (plan["expected"], plan["collected"], plan["success_ratio"]) == (2, 2, 1.0)  # 2 of 4 done, all good
    stats.outcome("d-1", Outcome(m(3), ok=False, reason=Reason.NO_REPLY), plan="daily", link="bus1", area="a")
    stats.round_finished(main)  # meter 4 was never reported (e.g. shutdown mid-round)
    plan = stats.snapshot()["today"]["plans"]["daily"]
    assert (plan["expected"], plan["collected"], plan["failed"]) == (4, 2, {"no_reply": 1})
    reread = RoundStats(plan="daily", round_id="d-1-r1", started=clock.t, expected=2, reread=1)
    stats.round_started(reread)
    stats.outcome("d-1-r1", Outcome(m(3), ok=True), plan="daily", link="bus1", area="a")
    stats.outcome("d-1-r1", Outcome(m(4), ok=True), plan="daily", link="bus1", area="a")
    stats.round_finished(reread)
    plan = stats.snapshot()["today"]["plans"]["daily"]
    assert (plan["expected"], plan["collected"], plan["failed"], plan["success_ratio"]) == (4, 4, {}, 1.0)


def test_a_degraded_skip_in_a_reread_keeps_the_days_root_cause_and_says_it() -> None:
    clock = Clock(at(1, 0, 10))
    stats = CollectionStats("st-01", TZ, clock=clock, degraded_after=2)
    run_round(stats, clock, "daily", "main", {m(1): Reason.NO_REPLY, m(2): Reason.BAD_FRAME, m(3): Reason.DEGRADED})
    run_round(stats, clock, "daily", "rr1", {m(1): Reason.DEGRADED, m(2): Reason.DEGRADED, m(3): Reason.DEGRADED},
              reread=1)
    day = stats.snapshot()["today"]["plans"]["daily"]
    # m3 was degraded from the start (failures of an earlier day): degraded is all the day knows of it
    assert day["failed"] == {"no_reply": 1, "bad_frame": 1, "degraded": 1}
    run_round(stats, clock, "daily", "rr2", {m(1): Reason.BAD_FRAME}, reread=2)  # a real failure still replaces
    assert stats.snapshot()["today"]["plans"]["daily"]["failed"] == {"bad_frame": 2, "degraded": 1}
    failing = {f["meter"]: f for f in stats.top_failing()}
    assert failing[m(2)]["reason"] == "degraded"
    assert failing[m(2)]["detail"] == "degraded detail (last failure bad_frame: bad_frame detail)"
    assert failing[m(3)]["detail"] == "degraded detail"  # no earlier failure known
