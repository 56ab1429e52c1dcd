"""What a control command is: actions, states, the command record and the errors callers see.

Shared by the engine, the store, the HTTP/MQTT/CLI interfaces and the prepaid policy, so
it holds data and rules about data only (no I/O). A command's fate is always one of the
terminal states; `reason` says why for `failed`, `expired` and `superseded`.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from protocols.dlt645 import Action as WireAction


class Action(enum.StrEnum):
    """The actions a user names; each maps to N1 of the 1C payload."""

    TRIP = "trip"
    ALLOW_CLOSE = "allow_close"
    CLOSE = "close"
    ALARM = "alarm"
    ALARM_RELEASE = "alarm_release"
    HOLD = "hold"
    HOLD_RELEASE = "hold_release"

    @property
    def wire(self) -> WireAction:
        return WIRE[self]

    @property
    def group(self) -> str:
        """Commands of one group fight over one piece of meter state; the latest intent wins."""
        return GROUP[self]

    @property
    def restores(self) -> bool:
        """Restores give a customer power (or silence) back: retried eagerly, never blocked by guards."""
        return self in (Action.CLOSE, Action.ALLOW_CLOSE, Action.ALARM_RELEASE)


WIRE = {
    Action.TRIP: WireAction.TRIP, Action.ALLOW_CLOSE: WireAction.ALLOW_CLOSE, Action.CLOSE: WireAction.CLOSE,
    Action.ALARM: WireAction.ALARM, Action.ALARM_RELEASE: WireAction.ALARM_RELEASE,
    Action.HOLD: WireAction.HOLD, Action.HOLD_RELEASE: WireAction.HOLD_RELEASE,
}
GROUP = {
    Action.TRIP: "relay", Action.ALLOW_CLOSE: "relay", Action.CLOSE: "relay",
    Action.ALARM: "alarm", Action.ALARM_RELEASE: "alarm",
    Action.HOLD: "hold", Action.HOLD_RELEASE: "hold",
}


class State(enum.StrEnum):
    PENDING = "pending"  # persisted, not sent yet (waiting for the bus, the link, a rate-limit slot, quiet hours)
    SENT = "sent"  # persisted as sent *before* the frame went out: a restart checks the meter before resending
    ACKNOWLEDGED = "acknowledged"  # the meter answered 9C
    VERIFIED = "verified"  # status word 3 shows the intended state
    FAILED = "failed"
    EXPIRED = "expired"  # its deadline passed before it could be sent; never sent after that
    SUPERSEDED = "superseded"  # a later command of the same group took over
    DRY_RUN = "dry_run"  # recorded in dry-run mode; nothing was sent

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({State.VERIFIED, State.FAILED, State.EXPIRED, State.SUPERSEDED, State.DRY_RUN})


class FailReason(enum.StrEnum):
    """Why a command failed; the refusals of the guards are reasons too."""

    UNAUTHORISED = "unauthorised"  # the meter refused the password (ERR bit 2)
    REFUSED = "refused"  # the meter answered with other error bits
    NOT_VERIFIED = "not_verified"  # acknowledged, but status word 3 never showed the state
    HOLD = "hold"  # guard: the meter is on the hold list or its status word says hold
    QUIET_HOURS = "quiet_hours"  # guard: no trips at night or on holidays
    RATE_LIMITED = "rate_limited"  # guard: station trip rate limit (when configured to refuse)
    NO_REPLY = "no_reply"  # sent, and the meter never answered within the deadline
    LINK_DOWN = "link_down"
    BAD_FRAME = "bad_frame"
    ERROR = "error"  # an internal error; the detail says which


@dataclass
class Command:
    """One control command as persisted. Times are UTC epoch seconds."""

    id: str  # opaque, unique, safe in URLs and topics
    request_id: str  # the caller's idempotency key
    meter: str
    action: Action
    state: State
    created: float
    deadline: float  # after this it is never sent
    actor: str = ""  # who asked (API token name, "mqtt", "prepaid", "cli")
    reason: str = ""  # why they asked (free text from the caller)
    source: str = "api"  # api | mqtt | cli | prepaid
    updated: float = 0.0
    fail_reason: str = ""  # FailReason / why expired / which command superseded it
    detail: str = ""  # human-readable: what the meter said, what the status word showed
    attempts: int = 0  # 1C frames sent
    sent_at: float | None = None
    acknowledged_at: float | None = None
    verified_at: float | None = None
    dry_run: bool = False
    relay: dict[str, bool] = field(default_factory=dict)  # last status word 3 seen (RelayStatus fields)

    def public(self) -> dict[str, Any]:
        """The JSON view for the API, MQTT and CLI (no secret is ever part of a command)."""
        data = asdict(self)
        data["action"] = str(self.action)
        data["state"] = str(self.state)
        data["terminal"] = self.state.terminal
        return data

    @classmethod
    def from_public(cls, data: dict[str, Any]) -> Command:
        """The inverse of `public()` (the store keeps that snapshot); unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["action"], values["state"] = Action(data["action"]), State(data["state"])
        return cls(**values)


class ControlError(Exception):
    """A command that cannot be accepted; `status` is the HTTP status the API answers with."""

    status = 400


class UnknownMeter(ControlError):
    status = 404


class UnknownAction(ControlError):
    status = 400


class Conflict(ControlError):
    """The request_id is already used by a different command (other meter or action)."""

    status = 409


class NotFound(ControlError):
    status = 404
