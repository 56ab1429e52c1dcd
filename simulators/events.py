"""Event records a meter keeps: power-down, cover-open, relay trip/close, programming, clears.

Records are newest first, at most ten each (what DI0 01..0A can address).
Their fields carry the names the DI table gives the record's quantities.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from simulators.profile import DAY, mix

DEPTH = 10
ENERGIES = ("forward_active", "reverse_active", "q1_reactive", "q2_reactive", "q3_reactive", "q4_reactive")
PREFIXES = ("power_down", "cover_open", "terminal_cover_open", "trip", "close", "programming", "meter_clear",
            "event_clear", "time_set", "demand_clear")


_FIELDS = frozenset({"count", "start", "end", "time", "operator", "before", "after", "di"})


class NoData(Exception):
    """The meter has no value for this name (answered as ERR no-data)."""


class Events:
    """Per-kind record lists plus totals (the count keeps growing after old records drop off)."""

    __slots__ = ("counts", "records")

    def __init__(self) -> None:
        # Only kinds that have happened are stored: most meters have few events, and a fleet has many meters.
        self.records: dict[str, list[dict[str, Any]]] = {}
        self.counts: dict[str, int] = {}

    @classmethod
    def with_history(cls, seed: int, now_clock: float) -> Events:
        """A believable past: a few power cuts and sometimes a cover opening, from the seed."""
        events = cls()
        cuts = int(mix(seed, 11) * 4)
        for k in range(cuts, 0, -1):
            start = now_clock - (5 + 20 * k + 10 * mix(seed, 12, k)) * DAY
            end = start + 60 + 7200 * mix(seed, 13, k)
            events.add("power_down", {"start": _dt(start), "end": _dt(end)})
        if mix(seed, 14) < 0.1:
            start = now_clock - (30 + 20 * mix(seed, 15)) * DAY
            zero = dict.fromkeys((f"{e}_energy_{w}" for e in ENERGIES for w in ("before", "after")), 0.0)
            events.add("cover_open", {"start": _dt(start), "end": _dt(start + 300), **zero})
        return events

    def add(self, kind: str, record: dict[str, Any]) -> None:
        records = self.records.setdefault(kind, [])
        records.insert(0, record)
        del records[DEPTH:]
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def clear(self, kind: str | None = None) -> None:
        for k in [kind] if kind else list(PREFIXES):
            self.records.pop(k, None)
            self.counts.pop(k, None)

    def owns(self, name: str) -> bool:
        for kind in PREFIXES:
            if name.startswith(kind + "_"):
                field = name[len(kind) + 1 :]
                if field in _FIELDS or field.startswith(ENERGIES) or field.startswith("di_"):
                    return True
        return False

    def value(self, name: str, index: int) -> Any:
        for kind in sorted(PREFIXES, key=len, reverse=True):  # terminal_cover_open before cover_open
            if name.startswith(kind + "_"):
                break
        else:
            raise NoData
        field = name[len(kind) + 1 :]
        if field == "count":
            return self.counts.get(kind, 0)
        records = self.records.get(kind, [])
        if not 1 <= index <= len(records):
            raise NoData
        record = records[index - 1]
        if field not in record:
            raise NoData
        return record[field]


def _dt(t_local: float) -> dt.datetime:
    return dt.datetime(1970, 1, 1) + dt.timedelta(seconds=round(t_local))
