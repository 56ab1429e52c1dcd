"""The account operations, each one atomic: it runs whole inside `journal.write` (writer thread).

An operation reads the account from the database (the truth, not the event loop's copy),
changes it, runs the state machine and persists the account together with the policy
actions it decided on, in the same transaction. So a transition and its commands are
durable before anything is submitted, and a crash can only leave actions to re-submit
under the same request_id, never a transition without its commands.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

from gateway.prepaid import store
from gateway.prepaid.account import Account, PolicyAction, Standing, Thresholds, estimate, evaluate, rebase
from gateway.prepaid.config import PrepaidConfig, check_thresholds
from gateway.prepaid.money import Conflict, UnknownAccount, format_money

Registers = dict[str, tuple[int, float]]  # quantity -> (Wh, reading time)
GROUPS = {"trip": "relay", "close": "relay", "allow_close": "relay", "alarm": "alarm", "alarm_release": "alarm"}
UNSET = object()


@dataclass(frozen=True, slots=True)
class Rules:
    """What the operations need from the config, fixed for the life of the policy."""

    defaults: Thresholds
    restore: str
    valid_for: float
    total: str
    tariffs: tuple[str, ...]
    act: bool = True  # False (prepaid disabled): balances are kept and estimated, no command is decided
    retry_after: float = 1800.0  # s before a relay command that did not get through is decided again

    @classmethod
    def of(cls, config: PrepaidConfig) -> Rules:
        return cls(Thresholds(config.fen("alarm_threshold"), config.fen("trip_threshold"),
                              config.fen("restore_threshold")), config.restore, config.valid_for,
                   config.energy_quantity, config.tariff_quantities, config.enabled, config.retry_after)


@dataclass(slots=True)
class Result:
    """An operation's outcome: the account as saved and what the policy must now submit."""

    account: Account
    actions: list[PolicyAction] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)
    outcome: str = "applied"  # applied | duplicate | stale
    register_back: int = 0


@dataclass(frozen=True, slots=True)
class Settings:
    """Account settings from the API/CSV; a field left UNSET keeps its value, None resets it to default."""

    price: object = UNSET  # int | None
    tariff_prices: object = UNSET  # dict[int, int]
    alarm: object = UNSET
    trip: object = UNSET
    restore: object = UNSET


def settle(conn: sqlite3.Connection, a: Account, rules: Rules, now: float, *, reachable: bool = False) -> Result:
    """Run the state machine on the current estimate; persist the account and any new actions.
    `reachable`: a reading just came from the meter, so a relay command that failed may go again."""
    result = Result(a)
    est = estimate(a, rules.total, rules.tariffs)
    if est.balance is not None and rules.act:
        state, decided = evaluate(a.state, a.last_estimate, est.balance, a.thresholds(rules.defaults), rules.restore)
        a.last_estimate = est.balance
        if not decided and reachable:
            decided = again(conn, a, rules, now)
        if decided:
            a.state = state
            a.seq += 1
            for action, why in decided:
                kinds = tuple(k for k, g in GROUPS.items() if g == GROUPS[action])
                result.superseded += store.supersede(conn, a.meter, kinds, f"prepaid:{a.meter}:{a.seq}:{action}")
                record = PolicyAction(request_id=f"prepaid:{a.meter}:{a.seq}:{action}", meter=a.meter, seq=a.seq,
                                      action=action, reason=why, created=now, deadline=now + rules.valid_for)
                store.add_action(conn, record)
                result.actions.append(record)
            store.trim_actions(conn, a.meter)
    store.put_account(conn, a, now)
    return result


def again(conn: sqlite3.Connection, a: Account, rules: Rules, now: float) -> list[tuple[str, str]]:
    """The relay command the account's state still calls for, when the last one did not get through
    (refused in quiet hours, no reply, expired while the meter was offline) and `retry_after` has
    passed. A meter on the hold list is not asked again; a superseded command is not a failure."""
    last = store.last_action(conn, a.meter, tuple(k for k, g in GROUPS.items() if g == "relay"))
    if last is None or not last.failed or "(hold)" in last.result or now - last.created < rules.retry_after:
        return []
    tripped = a.state is Standing.TRIPPED
    if tripped != (last.action == "trip"):
        return []  # the state moved on since: its own command was decided then
    why = f"again: the last {last.action} ended {last.result or last.status}"
    return [("trip" if tripped else rules.restore, why)]


def upsert(conn: sqlite3.Connection, meter: str, s: Settings, rules: Rules, now: float) -> Result:
    """Create the account or change its prices and thresholds. A price change first moves the
    reference to the latest registers, so energy already used stays at the old price."""
    a = store.get_account(conn, meter) or Account(meter=meter, created=now)
    price_changes = (s.price is not UNSET and s.price != a.price) or \
        (s.tariff_prices is not UNSET and s.tariff_prices != a.tariff_prices)
    if price_changes:
        rebase(a, rules.total, rules.tariffs)
    if s.price is not UNSET:
        a.price = s.price  # type: ignore[assignment]
        if s.tariff_prices is UNSET and s.price is not None:
            a.tariff_prices = {}
    if s.tariff_prices is not UNSET:
        a.tariff_prices = dict(s.tariff_prices)  # type: ignore[call-overload]
        if s.price is UNSET and a.tariff_prices:
            a.price = None
    for name in ("alarm", "trip", "restore"):
        value = getattr(s, name)
        if value is not UNSET:
            setattr(a, name, value)
    th = a.thresholds(rules.defaults)
    check_thresholds(th.alarm, th.trip, th.restore)
    return settle(conn, a, rules, now)


@dataclass(frozen=True, slots=True)
class Payment:
    meter: str
    amount: int  # fen, > 0
    payment_id: str
    source: str = "api"


@dataclass(frozen=True, slots=True)
class Update:
    """A balance from billing as of a time; `found`: the first register readings at or after that
    time already in the journal, which become the reference."""

    meter: str
    balance: int
    as_of: float
    update_id: str
    found: Registers
    source: str = "api"


def pay(conn: sqlite3.Connection, p: Payment, rules: Rules, now: float) -> Result:
    """Add a payment to the balance, once per payment_id."""
    a = store.get_account(conn, p.meter)
    if a is None:
        raise UnknownAccount(f"meter {p.meter} has no prepaid account (create it first: "
                             f"PUT /api/v1/accounts/{p.meter})")
    prior = store.find_payment(conn, p.payment_id)
    if prior is not None:
        if prior != (p.meter, p.amount):
            raise Conflict(f"payment_id {p.payment_id!r} was already used for {format_money(prior[1])} to meter "
                           f"{prior[0]}")
        return Result(a, outcome="duplicate")
    store.add_payment(conn, p.payment_id, p.meter, p.amount, received=now, source=p.source)
    if a.balance is None:  # a first purchase: the balance starts now
        a.balance, a.as_of = 0, now
        take_reference(a, a.latest, now)
    a.balance += p.amount
    return settle(conn, a, rules, now)


def update(conn: sqlite3.Connection, u: Update, rules: Rules, now: float) -> Result:
    """Set the balance billing computed as of `as_of`. Payments meterd received after that time are
    not in it yet and are added back. An update older than the last applied one is stale."""
    a = store.get_account(conn, u.meter) or Account(meter=u.meter, created=now)
    prior = store.find_update(conn, u.update_id)
    if prior is not None:
        if prior[:2] != (u.meter, u.balance):  # a retry without as_of gets a new default time: still the same
            raise Conflict(f"update_id {u.update_id!r} was already used for meter {prior[0]}: balance "
                           f"{format_money(prior[1])} as of {prior[2]}")
        return Result(a, outcome="duplicate")
    row = conn.execute("SELECT MAX(as_of) FROM prepaid_updates WHERE meter = ? AND applied = 1",
                       (u.meter,)).fetchone()
    stale = row[0] is not None and u.as_of < row[0]
    store.add_update(conn, u.update_id, u.meter, u.balance, as_of=u.as_of, received=now, source=u.source,
                     applied=not stale)
    if stale:
        return Result(a, outcome="stale")
    a.balance = u.balance + store.payments_after(conn, u.meter, u.as_of)
    a.as_of = u.as_of
    a.ref = {}
    for quantity, reg in u.found.items():
        if quantity not in a.latest or a.latest[quantity][1] < reg[1]:
            a.latest[quantity] = reg
    a.ref.update(u.found)
    take_reference(a, a.latest, u.as_of)
    return settle(conn, a, rules, now)


def take_reference(a: Account, registers: Registers, since: float) -> None:
    """Registers read at or after the balance's as-of time become the reference where it has none."""
    for quantity, reg in registers.items():
        if quantity not in a.ref and reg[1] >= since:
            a.ref[quantity] = reg


def registers(conn: sqlite3.Connection, batch: dict[str, Registers], rules: Rules, now: float) -> list[Result]:
    """New register readings of many meters in one transaction (one fsync for a whole round)."""
    results = []
    for meter, regs in batch.items():
        a = store.get_account(conn, meter)
        if a is None:
            continue
        back = 0
        for quantity, (wh, t) in sorted(regs.items(), key=lambda kv: kv[1][1]):
            last = a.latest.get(quantity)
            if last is not None and t <= last[1]:
                continue  # a re-read or an older reading: nothing new
            if last is not None and wh < last[0]:
                back += 1  # a replaced meter or a wrapped register: keep the estimate, restart from here
                rebase(a, rules.total, rules.tariffs)
                a.ref[quantity] = (wh, t)
            a.latest[quantity] = (wh, t)
            if a.balance is not None and a.as_of is not None:
                take_reference(a, {quantity: (wh, t)}, a.as_of)
        result = settle(conn, a, rules, now, reachable=True)
        result.register_back = back
        results.append(result)
    return results


def record_action(conn: sqlite3.Connection, action: PolicyAction) -> None:
    store.save_action(conn, action)
