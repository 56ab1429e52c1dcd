"""Injectable faults: what goes wrong on a real line, by probability or schedule, per fleet, bus or meter.

A `FaultPlan` holds rules; for each request the bus asks which faults hit
this (bus, meter) now. Every injected fault is counted by the bus, so tests
can compare what the gateway reports with what really happened.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

KINDS = {
    "no_reply": "the meter stays silent",
    "late_reply": "the reply comes after `delay_s` (default 2 s), past a normal timeout",
    "corrupt": "the reply's checksum is wrong",
    "truncated": "the reply stops half way",
    "garbage": "`bytes` (default 8) random bytes on the line before the reply",
    "echo": "the request is echoed back before the reply (2-wire adapter)",
    "dead": "the meter does not answer at all (use with a time window or probability 1)",
    "link_drop": "the connection is closed / the pty hung up instead of answering",
    "relay_stuck": "control is acknowledged but the relay does not move",
}


PARAMS = {"late_reply": ("delay_s",), "garbage": ("bytes",)}


class FaultError(ValueError):
    """A fault rule that cannot be understood (unknown kind, probability outside 0..1, ...)."""


@dataclass
class FaultRule:
    """One fault. Scope: `bus` and/or `meter` (None = everywhere). When: `probability` per request,
    or every `every`-th request, optionally only inside [`start`, `end`) (UTC seconds)."""

    kind: str
    probability: float = 1.0
    every: int | None = None
    bus: str | None = None
    meter: str | None = None
    start: float | None = None
    end: float | None = None
    params: dict[str, float] = field(default_factory=dict)
    _seen: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FaultError(f"unknown fault {self.kind!r}; known: {', '.join(sorted(KINDS))}")
        if not 0.0 <= self.probability <= 1.0:
            raise FaultError(f"fault {self.kind}: probability must be within 0..1, got {self.probability}")
        if self.every is not None and self.every < 1:
            raise FaultError(f"fault {self.kind}: every must be >= 1, got {self.every}")

    def applies(self, bus: str, meter: str | None, now: float) -> bool:
        if self.bus is not None and self.bus != bus:
            return False
        if self.meter is not None and self.meter != meter:
            return False
        if self.start is not None and now < self.start:
            return False
        return self.end is None or now < self.end

    def fires(self, rng: random.Random) -> bool:
        if self.every is not None:
            self._seen += 1
            return self._seen % self.every == 0
        return self.probability >= 1.0 or rng.random() < self.probability

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "probability": self.probability, "every": self.every, "bus": self.bus,
                "meter": self.meter, "start": self.start, "end": self.end, **self.params}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaultRule:
        data = dict(data)
        try:
            kind = str(data.pop("kind"))
        except KeyError as exc:
            raise FaultError("a fault needs a 'kind'") from exc
        known = {"probability", "every", "bus", "meter", "start", "end"}
        unknown = set(data) - known - set(PARAMS.get(kind, ()))
        if unknown:
            raise FaultError(f"fault {kind}: unknown keys {', '.join(sorted(unknown))}")
        try:
            params = {k: float(v) for k, v in data.items() if k not in known}
            return cls(kind, float(data.get("probability", 1.0)),
                       int(data["every"]) if data.get("every") is not None else None,
                       data.get("bus"), data.get("meter"),
                       float(data["start"]) if data.get("start") is not None else None,
                       float(data["end"]) if data.get("end") is not None else None, params)
        except (TypeError, ValueError) as exc:
            raise FaultError(f"fault {kind}: {exc}") from exc

    @classmethod
    def from_flag(cls, text: str) -> FaultRule:
        """`no_reply=0.02` (probability) or `dead=000000000003` (one meter, always)."""
        kind, sep, value = text.partition("=")
        kind = kind.strip()
        if kind not in KINDS:
            raise FaultError(f"unknown fault {kind!r}; known: {', '.join(sorted(KINDS))}")
        if not sep:
            return cls(kind)
        value = value.strip()
        if len(value) == 12 and value.isdigit():
            return cls(kind, meter=value)
        try:
            probability = float(value)
        except ValueError as exc:
            raise FaultError(f"--fault {text!r}: value must be a probability or a 12-digit address") from exc
        return cls(kind, probability)


class FaultPlan:
    """All rules in force; replaced as a whole or per scope through the API."""

    def __init__(self, rules: list[FaultRule] | None = None, seed: int = 0) -> None:
        self.rules = list(rules or [])
        self.rng = random.Random(seed)

    def draw(self, bus: str, meter: str | None, now: float) -> dict[str, FaultRule]:
        """The faults that hit this request."""
        hit: dict[str, FaultRule] = {}
        for rule in self.rules:
            if rule.kind not in hit and rule.applies(bus, meter, now) and rule.fires(self.rng):
                hit[rule.kind] = rule
        return hit

    def replace(self, rules: list[FaultRule], *, bus: str | None = None, meter: str | None = None) -> None:
        """Swap the rules of one scope (fleet when both are None) for new ones."""
        self.rules = [r for r in self.rules if not (r.bus == bus and r.meter == meter)] + rules

    def stuck(self, bus: str, meter: str, now: float) -> bool:
        return any(r.kind == "relay_stuck" and r.applies(bus, meter, now) for r in self.rules)
