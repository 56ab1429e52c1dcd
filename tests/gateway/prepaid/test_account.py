"""The policy's state machine and the estimate's edge cases (pure functions, no I/O)."""

from __future__ import annotations

import pytest

from gateway.prepaid.account import Account, Standing, Thresholds, estimate, evaluate, rebase
from gateway.prepaid.config import TARIFFS, TOTAL

TH = Thresholds(alarm=2000, trip=0, restore=0)
N, A, T = Standing.NORMAL, Standing.ALARMED, Standing.TRIPPED


@pytest.mark.parametrize(("state", "previous", "balance", "after", "actions"), [
    (N, None, 5000, N, []),
    (N, None, 1500, A, ["alarm"]),  # a new account that starts low is alarmed
    (N, 2500, 2000, A, ["alarm"]),  # at the threshold counts
    (N, 2500, 0, T, ["alarm", "trip"]),  # both thresholds in one step: both actions, in order
    (A, 1500, 0, T, ["trip"]),
    (A, 1500, 100, A, []),
    (T, -100, -50, T, []),  # still at or below restore
    (T, -100, 0, T, []),  # restore is exclusive
    (T, -100, 1, N, ["close", "alarm_release"]),
    (A, 1500, 2001, N, ["alarm_release"]),
    (N, 1000, 900, N, []),  # restored while still under the alarm threshold: no re-alarm on every reading
    (N, 1000, 0, T, ["alarm", "trip"]),  # ... but it still trips
])
def test_transitions(state, previous, balance, after, actions):
    new, decided = evaluate(state, previous, balance, TH, "close")
    assert new is after
    assert [a for a, _ in decided] == actions
    assert all(why for _, why in decided)


def test_the_configured_restore_is_used():
    _, decided = evaluate(T, -5, 100, TH, "allow_close")
    assert [a for a, _ in decided] == ["allow_close", "alarm_release"]


def test_an_overdraft_limit_trips_below_zero():
    th = Thresholds(alarm=1000, trip=-5000, restore=0)
    assert evaluate(A, 0, -4999, th, "close")[0] is A
    assert evaluate(A, 0, -5000, th, "close")[0] is T


def test_estimate_says_why_it_is_not_one():
    a = Account("000000000001")
    assert estimate(a, TOTAL, TARIFFS).note == "no balance yet"
    a.balance = 1000
    assert estimate(a, TOTAL, TARIFFS).note.startswith("no price")
    a.price = 500_000
    e = estimate(a, TOTAL, TARIFFS)
    assert (e.balance, e.estimated) == (1000, False) and "first register reading" in e.note
    a.ref[TOTAL] = (1_000_000, 10.0)
    a.latest[TOTAL] = (1_010_000, 20.0)  # 10 kWh at 0.5
    e = estimate(a, TOTAL, TARIFFS)
    assert (e.balance, e.estimated, e.reading_time, e.consumed_wh) == (500, True, 20.0, 10_000)


def test_partial_tariff_registers_are_flagged():
    a = Account("000000000001", tariff_prices={1: 1_000_000, 2: 300_000}, balance=10_000)
    a.ref[TARIFFS[0]] = (0, 1.0)
    a.latest[TARIFFS[0]] = (2000, 2.0)  # 2 kWh at 1.00
    e = estimate(a, TOTAL, TARIFFS)
    assert e.balance == 9800 and "some tariff registers" in e.note


def test_rebase_keeps_the_estimate():
    a = Account("000000000001", price=500_000, balance=1000, as_of=1.0)
    a.ref[TOTAL] = (0, 1.0)
    a.latest[TOTAL] = (1000, 5.0)  # 1 kWh = 0.50
    rebase(a, TOTAL, TARIFFS)
    assert (a.balance, a.as_of, a.ref) == (950, 5.0, {TOTAL: (1000, 5.0)})
    assert estimate(a, TOTAL, TARIFFS).balance == 950
