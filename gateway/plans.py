"""Plans: what to read and when. Pure schedule arithmetic, no I/O, so it can be tested exactly.

`every = "15m"` is aligned to the station's wall clock (:00, :15, ...);
`at = "00:10"` is daily in the station's timezone. Daily plans get re-read
rounds for the meters that failed, at offsets after the main round.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | float) -> float:
    """'15m', '1h30m', '90s', '2d', or a number of seconds -> seconds."""
    if isinstance(text, int | float):
        return float(text)
    compact = text.replace(" ", "")
    parts = _DURATION.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"{text!r} is not a duration (e.g. 90s, 15m, 1h30m, 2d)")
    return sum(float(n) * _UNITS[u] for n, u in parts)


class PlanConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    items: list[str] = Field(min_length=1)
    every: float | None = None
    at: dt.time | None = None
    jitter: float = 0.0
    meters: list[str] = []  # addresses; empty = every meter (after the link/area filters)
    links: list[str] = []
    areas: list[str] = []
    rereads: list[float] = []  # offsets after the main round's start (daily plans)

    @field_validator("every", "jitter", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("rereads", mode="before")
    @classmethod
    def _offsets(cls, value: object) -> object:
        if isinstance(value, list):
            return [parse_duration(v) if isinstance(v, str) else v for v in value]
        return value

    @field_validator("at", mode="before")
    @classmethod
    def _at(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return dt.time.fromisoformat(value)
            except ValueError as exc:
                raise ValueError(f"at must be HH:MM local time, got {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _when(self) -> PlanConfig:
        if (self.every is None) == (self.at is None):
            raise ValueError("a plan needs exactly one of `every` (e.g. \"15m\") or `at` (e.g. \"00:10\")")
        if self.every is not None and self.every < 1:
            raise ValueError("every must be at least 1 s")
        if self.rereads and self.at is None:
            raise ValueError("rereads are for daily plans (`at`)")
        if any(b <= a for a, b in zip(self.rereads, self.rereads[1:], strict=False)) or any(
                r <= 0 for r in self.rereads):
            raise ValueError("rereads must be positive and increasing")
        return self

    @property
    def daily(self) -> bool:
        return self.at is not None


def next_run(plan: PlanConfig, now: float, tz: ZoneInfo) -> float:
    """The next start time (UTC seconds) strictly after `now`, before jitter."""
    local = dt.datetime.fromtimestamp(now, tz)
    if plan.at is not None:
        candidate = dt.datetime.combine(local.date(), plan.at, tzinfo=tz)
        if candidate.timestamp() <= now:
            candidate = dt.datetime.combine(local.date() + dt.timedelta(days=1), plan.at, tzinfo=tz)
        return candidate.timestamp()
    assert plan.every is not None
    offset = local.utcoffset() or dt.timedelta(0)
    wall = now + offset.total_seconds()  # align to the local wall clock (15-min marks are local)
    nxt = math.floor(wall / plan.every + 1e-9) * plan.every + plan.every
    return nxt - offset.total_seconds()


def day_of(now: float, tz: ZoneInfo) -> dt.date:
    return dt.datetime.fromtimestamp(now, tz).date()
