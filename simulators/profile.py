"""A meter's load as a pure function of time, with its exact integral per tariff.

Energy registers must be the integral of the load a test can also read as
power, must never go backwards, and must cost no task or timer per meter
(a fleet has 100,000). So the load is piecewise constant per hour: a daily
shape (24 factors, per-meter variation from its seed) times a per-day factor
from a hash of (seed, day). The integral up to any time is then closed
form plus a cached prefix sum of day factors. Relay-open periods and load
overrides are `Segment`s layered on top by `Consumption`.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

DAY = 86400.0
HOUR = 3600.0

# A residential day, relative to the meter's base load (kW), hour 0..23.
RESIDENTIAL = (0.35, 0.3, 0.28, 0.27, 0.28, 0.35, 0.6, 0.9, 0.8, 0.7, 0.65, 0.7,
               0.8, 0.7, 0.6, 0.6, 0.7, 0.95, 1.3, 1.5, 1.4, 1.2, 0.9, 0.55)
# Time-of-use table: tariff (1 sharp, 2 peak, 3 flat, 4 valley) for each hour.
DEFAULT_TOU = (4, 4, 4, 4, 4, 4, 4, 3, 2, 2, 1, 1, 3, 3, 3, 3, 3, 2, 2, 1, 1, 2, 3, 4)
TARIFFS = 4


def mix(*values: int) -> float:
    """Deterministic hash of integers to [0, 1): the simulator's only randomness over time."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    h = h * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return ((h ^ (h >> 29)) & 0xFFFFFFFFFFFF) / float(1 << 48)


class Shape:
    """24 hourly factors and the TOU table, with per-tariff cumulative hours precomputed."""

    __slots__ = ("cum", "factors", "hours", "totals", "tou")

    def __init__(self, factors: tuple[float, ...], tou: tuple[int, ...] = DEFAULT_TOU) -> None:
        self.factors = factors
        self.tou = tou
        # cum[k][h]: factor-hours of tariff k (0 = all) before hour h; totals[k] = a whole day's.
        self.cum = [[0.0] * 25 for _ in range(TARIFFS + 1)]
        for h in range(24):
            for k in range(TARIFFS + 1):
                self.cum[k][h + 1] = self.cum[k][h] + (factors[h] if k in (0, tou[h]) else 0.0)
        self.totals = [row[24] for row in self.cum]
        # hours[k][h]: clock hours of tariff k before hour h (for a fixed load).
        self.hours = [[float(sum(1 for x in range(h) if k in (0, tou[x]))) for h in range(25)]
                      for k in range(TARIFFS + 1)]

    @classmethod
    def for_seed(cls, seed: int) -> Shape:
        """One of `VARIANTS` shared shapes: households differ, and 100k meters must not hold 100k tables."""
        variant = seed % VARIANTS
        shape = _SHAPES.get(variant)
        if shape is None:
            factors = tuple(f * (0.85 + 0.3 * mix(variant, 7, h)) for h, f in enumerate(RESIDENTIAL))
            shape = _SHAPES[variant] = cls(factors, DEFAULT_TOU)
        return shape


VARIANTS = 64
_SHAPES: dict[int, Shape] = {}



@dataclass(frozen=True, slots=True)
class Segment:
    """From `start` (local seconds) on, the load is the profile, a fixed kW, or off (relay open)."""

    start: float
    mode: str  # "profile" | "fixed" | "off"
    kw: float = 0.0


class Consumption:
    """Energy per tariff of one meter at any local time (seconds since 1970 in local wall time)."""

    __slots__ = ("_bounds", "_day_cache", "_starts", "base_kw", "epoch_day", "seed", "segments", "shape",
                 "start_energy")

    def __init__(self, seed: int, base_kw: float, epoch: float, start_energy: list[float],
                 shape: Shape | None = None) -> None:
        self.seed = seed
        self.base_kw = base_kw
        self.shape = shape or Shape.for_seed(seed)
        self.epoch_day = int(epoch // DAY)
        self.segments = [Segment(self.epoch_day * DAY, "profile")]
        self._starts = [self.epoch_day * DAY]
        # Registers at the start of each segment; index 0 = total, 1..4 = tariffs.
        self._bounds = [list(start_energy)]
        self.start_energy = start_energy
        self._day_cache = (self.epoch_day, 0.0)

    def day_factor(self, day: int) -> float:
        weekend = 1.12 if (day + 3) % 7 >= 5 else 1.0  # 1970-01-01 was a Thursday
        return weekend * (0.75 + 0.5 * mix(self.seed, day))

    def _prefix(self, day: int) -> float:
        """Sum of day factors from the epoch day up to (not including) `day`, cached forward."""
        cached_day, total = self._day_cache
        if day < cached_day:
            cached_day, total = self.epoch_day, 0.0
        for d in range(cached_day, day):
            total += self.day_factor(d)
        if day >= self._day_cache[0]:
            self._day_cache = (day, total)
        return total

    def power(self, t: float) -> float:
        """kW drawn at local time t (before relay state)."""
        seg = self.segments[bisect.bisect_right(self._starts, t) - 1] if t >= self._starts[0] else None
        if seg is None or seg.mode == "off":
            return 0.0
        if seg.mode == "fixed":
            return seg.kw
        day = int(t // DAY)
        return self.base_kw * self.shape.factors[int(t % DAY // HOUR)] * self.day_factor(day)

    def _profile_integral(self, t: float, k: int) -> float:
        day = int(t // DAY)
        h = int(t % DAY // HOUR)
        frac = (t % HOUR) / HOUR
        s = self.shape
        today = s.cum[k][h] + (s.factors[h] * frac if k in (0, s.tou[h]) else 0.0)
        return self.base_kw * (self._prefix(day) * s.totals[k] + self.day_factor(day) * today)

    def _flat_integral(self, t: float, k: int, kw: float) -> float:
        day = int(t // DAY)
        h = int(t % DAY // HOUR)
        frac = (t % HOUR) / HOUR
        s = self.shape
        hours = s.hours[k]
        part = hours[h] + (frac if k in (0, s.tou[h]) else 0.0)
        return kw * (day * hours[24] + part)

    def _segment_energy(self, seg: Segment, t0: float, t1: float, k: int) -> float:
        if seg.mode == "off" or t1 <= t0:
            return 0.0
        if seg.mode == "fixed":
            return self._flat_integral(t1, k, seg.kw) - self._flat_integral(t0, k, seg.kw)
        return self._profile_integral(t1, k) - self._profile_integral(t0, k)

    def energy(self, t: float) -> list[float]:
        """kWh registers [total, t1, t2, t3, t4] at local time t; constant before the epoch."""
        i = bisect.bisect_right(self._starts, t) - 1
        if i < 0:
            return list(self.start_energy)
        seg = self.segments[i]
        base = self._bounds[i]
        return [base[k] + self._segment_energy(seg, seg.start, t, k) for k in range(TARIFFS + 1)]

    def change(self, t: float, mode: str, kw: float = 0.0) -> None:
        """From local time t on, the load follows `mode`. Changes must come in time order."""
        last = self.segments[-1]
        if t < last.start:
            raise ValueError("load changes must be in time order")
        if last.mode == mode and last.kw == kw:
            return
        bounds = self.energy(t)
        if t == last.start:
            self.segments[-1] = Segment(t, mode, kw)
            return
        self.segments.append(Segment(t, mode, kw))
        self._starts.append(t)
        self._bounds.append(bounds)

    def reset(self, t: float) -> None:
        """Meter clear (1A): every register restarts from zero at local time t; the load goes on."""
        last = self.segments[-1]
        self.segments.append(Segment(t, last.mode, last.kw))
        self._starts.append(t)
        self._bounds.append([0.0] * (TARIFFS + 1))

    def max_hourly_power(self, first_day: int, last_day: int, until: float) -> tuple[float, float]:
        """Highest hourly kW between two days (inclusive) up to `until`, and when it began."""
        best, when = 0.0, first_day * DAY
        peak_hour = max(range(24), key=lambda h: self.shape.factors[h])
        for day in range(max(first_day, self.epoch_day), last_day + 1):
            t = day * DAY + peak_hour * HOUR
            if t > until:
                break
            kw = self.power(t)
            if kw > best:
                best, when = kw, t
        return best, when


def phase_wave(seed: int, t: float, period: float, salt: int) -> float:
    """A slow deterministic wobble in [-1, 1] for voltages and frequency."""
    return math.sin(2 * math.pi * (t / period + mix(seed, salt)))
