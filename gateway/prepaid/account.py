"""A prepaid account and the two rules that matter: how its balance is estimated, and when it acts.

Pure data and arithmetic (no I/O), so the ledger can run it inside one journal transaction and
the tests can run it a million times. Money is integer fen, prices micro-units per kWh, registers
integer Wh (see money.py).

State machine (B = the estimated balance, A/T/R = alarm/trip/restore thresholds):
- not tripped and B <= T: trip (and alarm first if the account was normal) -> tripped
- normal and B <= A, having been above A (or never evaluated): alarm -> alarmed
- tripped and B > R: restore + alarm_release -> normal
- alarmed and B > A: alarm_release -> normal
"Crossing" is what acts: an account restored with a balance still under A is not re-alarmed on
every reading, only tripped at T, so the meter never flaps between alarm and release.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from gateway.control.model import TERMINAL
from gateway.prepaid.money import cost_fen, format_money, format_price

FINISHED = frozenset(str(s) for s in TERMINAL)


class Standing(enum.StrEnum):
    NORMAL = "normal"
    ALARMED = "alarmed"
    TRIPPED = "tripped"


@dataclass(frozen=True, slots=True)
class Thresholds:
    alarm: int
    trip: int
    restore: int


@dataclass(slots=True)
class Account:
    """One meter's account. `balance` is the balance (fen) at the reference point `as_of`; `ref`
    holds the registers at the reference (quantity -> (Wh, reading time)), `latest` the newest."""

    meter: str
    price: int | None = None  # flat, micro-units per kWh
    tariff_prices: dict[int, int] = field(default_factory=dict)  # tariff 1..4 -> micro-units per kWh
    alarm: int | None = None  # thresholds in fen; None = the configured default
    trip: int | None = None
    restore: int | None = None
    balance: int | None = None
    as_of: float | None = None
    ref: dict[str, tuple[int, float]] = field(default_factory=dict)
    latest: dict[str, tuple[int, float]] = field(default_factory=dict)
    state: Standing = Standing.NORMAL
    seq: int = 0  # transitions so far: part of every policy command's request_id
    last_estimate: int | None = None  # the balance the state machine last saw
    rev: int = 0  # saves so far; the in-memory copy keeps the newest
    created: float = 0.0
    updated: float = 0.0

    def thresholds(self, default: Thresholds) -> Thresholds:
        return Thresholds(default.alarm if self.alarm is None else self.alarm,
                          default.trip if self.trip is None else self.trip,
                          default.restore if self.restore is None else self.restore)

    def pricing(self, total: str, tariffs: tuple[str, ...]) -> list[tuple[str, int]]:
        """(register quantity, price) pairs this account is charged by."""
        if self.tariff_prices:
            return [(tariffs[n - 1], p) for n, p in sorted(self.tariff_prices.items())]
        return [] if self.price is None else [(total, self.price)]


@dataclass(frozen=True, slots=True)
class Estimate:
    balance: int | None  # fen; None = no balance known yet
    estimated: bool  # True when energy since the reference was charged
    reading_time: float | None  # the newest register reading it is based on
    consumed_wh: int
    cost: int
    note: str  # why it is (not) an estimate


def estimate(account: Account, total: str, tariffs: tuple[str, ...]) -> Estimate:
    """balance at reference - (registers now - registers at reference) x price, one rounding."""
    if account.balance is None:
        return Estimate(None, False, None, 0, 0, "no balance yet")
    pricing = account.pricing(total, tariffs)
    if not pricing:
        return Estimate(account.balance, False, None, 0, 0, "no price: not estimated")
    weighted = consumed = 0
    times: list[float] = []
    for quantity, price in pricing:
        if quantity in account.ref and quantity in account.latest:
            delta = account.latest[quantity][0] - account.ref[quantity][0]
            weighted += delta * price
            consumed += delta
            times.append(account.latest[quantity][1])
    if not times:
        return Estimate(account.balance, False, None, 0, 0, "waiting for the first register reading")
    cost = cost_fen(weighted)
    note = "" if len(times) == len(pricing) else "some tariff registers not read yet"
    return Estimate(account.balance - cost, True, max(times), consumed, cost, note)


def evaluate(state: Standing, previous: int | None, balance: int,
             th: Thresholds, restore: str) -> tuple[Standing, list[tuple[str, str]]]:
    """The next state and the (action, why) pairs to issue; see the module docstring."""
    money = format_money
    if state is not Standing.TRIPPED and balance <= th.trip:
        why = f"balance {money(balance)} <= trip threshold {money(th.trip)}"
        first = [("alarm", why)] if state is Standing.NORMAL else []
        return Standing.TRIPPED, [*first, ("trip", why)]
    crossed = previous is None or previous > th.alarm
    if state is Standing.NORMAL and balance <= th.alarm and crossed:
        return Standing.ALARMED, [("alarm", f"balance {money(balance)} <= alarm threshold {money(th.alarm)}")]
    if state is Standing.TRIPPED and balance > th.restore:
        why = f"balance {money(balance)} > restore threshold {money(th.restore)}"
        return Standing.NORMAL, [(restore, why), ("alarm_release", why)]
    if state is Standing.ALARMED and balance > th.alarm:
        return Standing.NORMAL, [("alarm_release", f"balance {money(balance)} > alarm threshold {money(th.alarm)}")]
    return state, []


def rebase(account: Account, total: str, tariffs: tuple[str, ...]) -> None:
    """Move the reference to the latest registers, keeping the estimate: before a price change
    (energy used so far stays at the old price) and when a register goes back (a new meter)."""
    est = estimate(account, total, tariffs)
    if est.balance is not None:
        account.balance = est.balance
    account.ref = dict(account.latest)
    if est.reading_time is not None:
        account.as_of = est.reading_time


@dataclass(slots=True)
class PolicyAction:
    """A command the policy decided on, persisted before it is submitted to the control engine.

    status: pending (not submitted yet) | submitted | superseded (a later transition of the same
    relay/alarm group came first) | expired (its validity passed before it could be submitted) |
    rejected (the control engine refused to accept it). `result` follows the command's own state.
    """

    request_id: str
    meter: str
    seq: int
    action: str
    reason: str
    created: float
    deadline: float
    status: str = "pending"
    command_id: str | None = None
    result: str = ""
    detail: str = ""

    @property
    def open(self) -> bool:
        """Not finished: waiting to be submitted, or submitted and its command not in a terminal state."""
        if self.status == "pending":
            return True
        return self.status == "submitted" and self.result.split(" ")[0] not in FINISHED

    @property
    def failed(self) -> bool:
        """Finished without getting through: refused, expired, or its command failed or expired."""
        if self.status in ("rejected", "expired"):
            return True
        return self.status == "submitted" and self.result.split(" ")[0] in ("failed", "expired")

    def public(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "action": self.action, "status": self.status,
                "command_id": self.command_id, "result": self.result, "detail": self.detail,
                "reason": self.reason, "created": self.created}


def view(account: Account, est: Estimate, th: Thresholds, actions: list[PolicyAction],
         currency: str) -> dict[str, Any]:
    """The account as the API, MQTT and CLI show it (money as decimal strings)."""
    pending = [a.public() for a in actions if a.open]
    last = actions[-1].public() if actions else None
    return {
        "meter": account.meter, "currency": currency, "state": str(account.state),
        "balance": format_money(account.balance), "balance_as_of": account.as_of,
        "estimated_balance": format_money(est.balance), "estimated": est.estimated,
        "estimate_reading_time": est.reading_time, "estimate_note": est.note,
        "consumed_kwh": f"{est.consumed_wh / 1000:.3f}", "consumed_cost": format_money(est.cost),
        "price": format_price(account.price),
        "tariff_prices": {str(n): format_price(p) for n, p in sorted(account.tariff_prices.items())},
        "alarm_threshold": format_money(th.alarm), "trip_threshold": format_money(th.trip),
        "restore_threshold": format_money(th.restore),
        "overrides": [n for n in ("alarm", "trip", "restore") if getattr(account, n) is not None],
        "pending_actions": pending, "last_action": last, "transitions": account.seq,
        "updated": account.updated,
    }
