"""The guards a trip must pass: quiet hours (and holidays) and the station's trip rate.

Both are pure and take the time as an argument, so they are tested without waiting
and the engine can ask "until when?" to defer a trip instead of polling.
"""

from __future__ import annotations

import datetime as dt
from collections import deque
from collections.abc import Iterable
from zoneinfo import ZoneInfo

WINDOW = 60.0  # s: the trip rate's sliding window


class QuietHours:
    """No trips in a daily local window (which may wrap midnight) nor on holidays."""

    def __init__(self, window: tuple[dt.time, dt.time] | None, holidays: Iterable[dt.date], tz: ZoneInfo) -> None:
        self.window = window
        self.holidays = frozenset(holidays)
        self.tz = tz

    @property
    def enabled(self) -> bool:
        return self.window is not None or bool(self.holidays)

    def quiet(self, now: float) -> bool:
        local = dt.datetime.fromtimestamp(now, self.tz)
        if local.date() in self.holidays:
            return True
        if self.window is None:
            return False
        start, end = self.window
        t = local.time()
        return start <= t < end if start < end else (t >= start or t < end)

    def why(self, now: float) -> str:
        local = dt.datetime.fromtimestamp(now, self.tz)
        if local.date() in self.holidays:
            return f"{local.date().isoformat()} is a holiday: no trips"
        assert self.window is not None
        start, end = self.window
        return f"quiet hours {start:%H:%M}-{end:%H:%M}: no trips"

    def ends(self, now: float) -> float:
        """The first moment at or after `now` that is not quiet (`now` itself when it is not)."""
        t = now
        for _ in range(1000):  # holidays chain day by day; a year of them is 366 steps
            if not self.quiet(t):
                return t
            local = dt.datetime.fromtimestamp(t, self.tz)
            if local.date() in self.holidays:
                nxt = dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(0), self.tz)
            else:
                assert self.window is not None
                end = self.window[1]
                day = local.date() if local.time() < end else local.date() + dt.timedelta(days=1)
                nxt = dt.datetime.combine(day, end, self.tz)
            t = max(nxt.timestamp(), t + 1.0)
        return t


class TripRate:
    """At most `per_min` trips per station in any 60 s window."""

    def __init__(self, per_min: int) -> None:
        self.per_min = per_min
        self._taken: deque[float] = deque()

    def take(self, now: float) -> float:
        """Take a slot: 0.0 when taken, else the seconds until one frees (nothing taken)."""
        while self._taken and self._taken[0] <= now - WINDOW:
            self._taken.popleft()
        if len(self._taken) < self.per_min:
            self._taken.append(now)
            return 0.0
        return max(self._taken[0] + WINDOW - now, 0.001)
