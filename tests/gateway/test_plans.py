"""Plan schedules are exact wall-clock arithmetic in the station's timezone."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from gateway.plans import PlanConfig, next_run, parse_duration

TZ = ZoneInfo("Asia/Shanghai")


def at(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=TZ).timestamp()


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("1h30m", 5400), ("2d", 172800),
                                               ("250ms", 0.25), (5, 5.0)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "15", "m15", "1x", "1h 2"])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_every_is_aligned_to_the_local_wall_clock():
    plan = PlanConfig(name="p", items=["frequency"], every="15m")
    assert next_run(plan, at("2026-11-22 14:07:31"), TZ) == at("2026-11-22 14:15:00")
    assert next_run(plan, at("2026-11-22 14:15:00"), TZ) == at("2026-11-22 14:30:00")
    hourly = PlanConfig(name="h", items=["frequency"], every="1h")
    assert next_run(hourly, at("2026-11-22 23:59:59"), TZ) == at("2026-11-23 00:00:00")


def test_daily_at_local_time():
    plan = PlanConfig(name="d", items=["daily_freeze_last1"], at="00:10", rereads=["20m", "60m", "3h"])
    assert next_run(plan, at("2026-11-22 00:09:59"), TZ) == at("2026-11-22 00:10:00")
    assert next_run(plan, at("2026-11-22 00:10:00"), TZ) == at("2026-11-23 00:10:00")
    assert plan.rereads == [1200, 3600, 10800]
    assert plan.daily


@pytest.mark.parametrize(("fields", "message"), [
    ({"every": "15m", "at": "00:10"}, "exactly one"),
    ({}, "exactly one"),
    ({"every": "15m", "rereads": ["20m"]}, "daily"),
    ({"at": "00:10", "rereads": ["60m", "20m"]}, "increasing"),
    ({"at": "25:00"}, "HH:MM"),
])
def test_bad_plans_say_why(fields, message):
    with pytest.raises(ValidationError, match=message):
        PlanConfig(name="p", items=["frequency"], **fields)
