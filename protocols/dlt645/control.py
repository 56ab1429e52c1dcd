"""Remote control (2007 function 1C): trip, allow-close, close, alarm and hold.

The 16-byte payload is PA P0P1P2 C0..C3 N1 N2 N3..N8 (deadline ss mm hh DD
MM YY). Meters with an ESAM security module need an encrypted payload, so
payload building sits behind `PayloadBuilder`; `PlaintextBuilder` is the
default. A 9C answer only means "accepted": the relay state must be read
back from status word 3, which `RelayStatus` interprets.
"""

from __future__ import annotations

import datetime as dt
from enum import IntEnum
from typing import NamedTuple, Protocol

from protocols.dlt645.errors import DecodeError, EncodeError
from protocols.dlt645.frame import build
from protocols.dlt645.requests import DEFAULT_AUTH, Auth
from protocols.dlt645.spec import CONTROL

FUNCTION = 0x1C
STATUS_WORD_3 = 0x04000503


class Action(IntEnum):
    """N1 of the 1C payload."""

    TRIP = 0x1A  # 拉闸
    ALLOW_CLOSE = 0x1B  # 合闸允许: the customer closes the relay by pressing the button
    CLOSE = 0x1C  # 直接合闸
    ALARM = 0x2A
    ALARM_RELEASE = 0x2B
    HOLD = 0x3A  # 保电: the meter must not trip
    HOLD_RELEASE = 0x3B


class ControlPayload(NamedTuple):
    auth: Auth
    action: Action | int
    n2: int
    deadline: dt.datetime | None  # None when the meter sent an impossible date


class PayloadBuilder(Protocol):
    """Builds the (plain, unscrambled) DATA of a 1C request."""

    def payload(self, address: str, action: Action, deadline: dt.datetime) -> bytes: ...


class PlaintextBuilder:
    """The standard's plaintext payload. N2 is reserved; one vendor wants 01 (verify)."""

    def __init__(self, auth: Auth = DEFAULT_AUTH, n2: int = 0) -> None:
        self.auth = auth
        self.n2 = n2

    def payload(self, address: str, action: Action, deadline: dt.datetime) -> bytes:
        if deadline.year < 2000 or deadline.year > 2099:
            raise EncodeError(f"deadline {deadline} is outside 2000..2099")
        return bytes(CONTROL.build({
            "auth": {"level": self.auth.level, "password": int(self.auth.password),
                     "operator": bytes.fromhex(self.auth.operator)[::-1]},
            "action": int(action),
            "n2": self.n2,
            "deadline": {"second": deadline.second, "minute": deadline.minute, "hour": deadline.hour,
                         "day": deadline.day, "month": deadline.month, "year": deadline.year - 2000},
        }))

    def __repr__(self) -> str:
        return f"PlaintextBuilder(auth={self.auth!r}, n2={self.n2})"


def control_request(address: str, action: Action, deadline: dt.datetime, *,
                    builder: PayloadBuilder | None = None, auth: Auth = DEFAULT_AUTH,
                    preamble: int = 0) -> bytes:
    """A 1C frame; `deadline` is the validity deadline in the meter's local time."""
    data = (builder or PlaintextBuilder(auth)).payload(address, Action(action), deadline)
    return build(address, FUNCTION, data, preamble=preamble)


def parse_control_payload(data: bytes) -> ControlPayload:
    """The meter's side: read a plaintext 1C payload (DecodeError if it is not 16 bytes of it)."""
    if len(data) != 16:
        raise DecodeError(f"a plaintext 1C payload is 16 bytes, got {len(data)}")
    try:
        parsed = CONTROL.parse(data)
        auth = Auth(parsed.auth.level, f"{parsed.auth.password:06d}", parsed.auth.operator[::-1].hex())
    except (ValueError, EncodeError) as exc:  # non-BCD password or operator
        raise DecodeError(f"1C payload has a malformed password or operator code: {exc}") from exc
    d = parsed.deadline
    try:
        deadline: dt.datetime | None = dt.datetime(2000 + d.year, d.month, d.day, d.hour, d.minute, d.second)
    except ValueError:
        deadline = None
    try:
        action: Action | int = Action(parsed.action)
    except ValueError:
        action = parsed.action
    return ControlPayload(auth, action, parsed.n2, deadline)


class RelayStatus(NamedTuple):
    """Status word 3 read as the relay's truth (bit 4 actual state, bit 6 command, bit 7 alarm)."""

    relay_open: bool
    trip_commanded: bool
    pre_trip_alarm: bool
    hold: bool

    @classmethod
    def from_word(cls, word: int) -> RelayStatus:
        return cls(bool(word & 0x10), bool(word & 0x40), bool(word & 0x80), bool(word & 0x1000))

    def satisfies(self, action: Action) -> bool:
        """True when the meter's state shows `action` took effect.

        ALLOW_CLOSE is satisfied by "command cleared, relay still open"
        (waiting for the customer) as well as by a closed relay.
        """
        if action is Action.TRIP:
            return self.relay_open
        if action is Action.CLOSE:
            return not self.relay_open and not self.trip_commanded
        if action is Action.ALLOW_CLOSE:
            return not self.trip_commanded
        if action is Action.HOLD:
            return self.hold
        if action is Action.HOLD_RELEASE:
            return not self.hold
        if action is Action.ALARM:
            return self.pre_trip_alarm
        return not self.pre_trip_alarm
