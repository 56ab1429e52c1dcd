"""The relay and cost-control behaviour of a remote-fee-control meter (function 1C).

Status word 3 always tells the truth: bit 4 is the relay's real state, bit 6
the last command, bit 7 the pre-trip alarm (also shown while a trip delay
runs), bit 12 power hold. A delayed trip is applied lazily when anything
looks at the meter after its due time, so a meter costs no timer.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from protocols.dlt645 import Action, ControlPayload, Error2007

if TYPE_CHECKING:
    from simulators.meter import Meter


class Relay:
    __slots__ = ("alarm", "hold", "is_open", "last_operator", "trip_at", "trip_command", "trip_delay_s")

    def __init__(self, trip_delay_s: int = 0) -> None:
        self.is_open = False
        self.trip_command = False
        self.alarm = False
        self.hold = False
        self.trip_at: float | None = None  # UTC seconds when a delayed trip opens the relay
        self.trip_delay_s = trip_delay_s
        self.last_operator = "00000000"

    def settle(self, meter: Meter, now: float) -> None:
        """Apply a delayed trip whose time has come (at its due time, not at `now`)."""
        if self.trip_at is not None and now >= self.trip_at:
            when = self.trip_at
            self.trip_at = None
            self._open(meter, when)

    def word_bits(self) -> int:
        bits = 0
        if self.is_open:
            bits |= 0x10
        if self.trip_command:
            bits |= 0x40
        if self.alarm or self.trip_at is not None:
            bits |= 0x80
        if self.hold:
            bits |= 0x1000
        return bits

    def control(self, meter: Meter, payload: ControlPayload, now: float) -> int:
        """Carry out a 1C command; return 0 when accepted, else the ERR bits of the refusal."""
        self.settle(meter, now)
        if meter.passwords.get(payload.auth.level) != payload.auth.password:
            return Error2007.UNAUTHORIZED
        clock = meter.clock_datetime(now)
        if payload.deadline is None or payload.deadline < clock:
            return Error2007.OTHER  # past its validity deadline by the meter's own clock
        action = payload.action
        if not isinstance(action, Action):
            return Error2007.OTHER
        if action is Action.TRIP and self.hold:
            return Error2007.OTHER  # 保电: a held meter refuses to trip
        self.last_operator = payload.auth.operator
        if meter.relay_stuck:  # fault: acknowledges, but nothing moves
            return 0
        if action is Action.TRIP:
            self.trip_command = True
            if self.trip_delay_s > 0 and not self.is_open:
                self.trip_at = now + self.trip_delay_s
            else:
                self._open(meter, now)
        elif action is Action.ALLOW_CLOSE:
            self.trip_command = False
            self.trip_at = None  # the customer closes it with the button
        elif action is Action.CLOSE:
            self.trip_command = False
            self.trip_at = None
            self._close(meter, now)
        elif action is Action.ALARM:
            self.alarm = True
        elif action is Action.ALARM_RELEASE:
            self.alarm = False
        elif action is Action.HOLD:
            self.hold = True
            self.trip_at = None
        elif action is Action.HOLD_RELEASE:
            self.hold = False
        return 0

    def press_button(self, meter: Meter, now: float) -> bool:
        """The customer presses the button: closes an open relay unless a trip is still commanded."""
        self.settle(meter, now)
        if self.is_open and not self.trip_command:
            self._close(meter, now)
            return True
        return False

    def _open(self, meter: Meter, when: float) -> None:
        if self.is_open:
            return
        self.is_open = True
        meter.consumption.change(meter.real_local(when), "off")
        meter.events.add("trip", meter.relay_record(when, self.last_operator))

    def _close(self, meter: Meter, when: float) -> None:
        if not self.is_open:
            return
        self.is_open = False
        kw = meter.load_override
        meter.consumption.change(meter.real_local(when), "profile" if kw is None else "fixed", kw or 0.0)
        meter.events.add("close", meter.relay_record(when, self.last_operator))

    def describe(self, now: float) -> dict[str, object]:
        return {
            "open": self.is_open,
            "trip_command": self.trip_command,
            "alarm": self.alarm,
            "pre_trip_alarm": bool(self.word_bits() & 0x80),
            "hold": self.hold,
            "trip_due": dt.datetime.fromtimestamp(self.trip_at, dt.UTC).isoformat() if self.trip_at else None,
            "trip_delay_s": self.trip_delay_s,
        }
