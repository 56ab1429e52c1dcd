"""Money arithmetic: integer fen, exact parsing, one rounding, and estimates that never drift."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.prepaid.account import Account, estimate
from gateway.prepaid.config import TARIFFS, TOTAL, PrepaidConfig
from gateway.prepaid.money import (
    PrepaidError,
    cost_fen,
    energy_wh,
    format_money,
    format_price,
    parse_money,
    parse_price,
)

fen = st.integers(min_value=-10**10, max_value=10**10)
prices = st.integers(min_value=0, max_value=100 * 10**6)


@given(fen)
def test_money_round_trips_through_its_text(value):
    assert parse_money(format_money(value)) == value


@given(prices)
def test_price_round_trips_through_its_text(value):
    assert parse_price(format_price(value)) == value


@given(st.lists(st.integers(min_value=1, max_value=10**7), min_size=1, max_size=50))
def test_payments_add_up_exactly(amounts):
    texts = [format_money(a) for a in amounts]
    assert sum(parse_money(t) for t in texts) == parse_money(str(sum(Decimal(t) for t in texts)))


def test_float_amounts_do_not_drift():
    assert sum(parse_money(0.1) for _ in range(10)) == 100  # 0.1 + ... + 0.1 as floats is 0.9999999999999999
    assert parse_money(19.99) == 1999 and parse_money("1e2") == 10000


@pytest.mark.parametrize(("value", "message"), [
    ("12.345", "fractions of a fen"), ("abc", "must be a number"), (True, "must be a number"),
    (None, "must be a number"), ("nan", "finite"), ("1e20", "out of range"), ([1], "must be a number"),
])
def test_bad_amounts_are_refused_with_the_reason(value, message):
    with pytest.raises(PrepaidError, match=message):
        parse_money(value)


def test_payments_must_be_positive_and_prices_bounded():
    with pytest.raises(PrepaidError, match="more than 0"):
        parse_money("0", positive=True)
    with pytest.raises(PrepaidError, match="more than 6 decimals"):
        parse_price("0.1234567")
    with pytest.raises(PrepaidError, match="between 0 and 100"):
        parse_price("-0.5")
    assert parse_price("0.5283") == 528300 and format_price(528300) == "0.5283" and format_price(1_000_000) == "1.00"


def test_energy_registers_become_integer_wh():
    assert energy_wh(12345.67) == 12345670
    assert energy_wh(0.01) == 10
    for bad in (-1.0, float("nan"), float("inf"), "12", None, True):
        assert energy_wh(bad) is None


def exact_cost(wh: int, price: int) -> int:
    """The same cost, computed independently with decimals: kWh x currency/kWh -> fen, half up."""
    kwh = Decimal(wh) / 1000
    unit_price = Decimal(price) / 10**6
    return int((kwh * unit_price * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@given(st.integers(min_value=0, max_value=10**9), prices)
def test_cost_is_exact(wh, price):
    assert cost_fen(wh * price) == exact_cost(wh, price)


@given(st.integers(min_value=-10**8, max_value=10**8), prices,
       st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=100))
def test_the_estimate_depends_only_on_the_reference_and_the_newest_register(balance, price, steps):
    """Readings one after another never accumulate rounding: no drift however many polls there are."""
    a = Account("000000000001", price=price, balance=balance)
    start = 5_000_000
    a.ref[TOTAL] = a.latest[TOTAL] = (start, 0.0)
    register = start
    for i, step in enumerate(steps, 1):
        register += step
        a.latest[TOTAL] = (register, float(i))
    est = estimate(a, TOTAL, TARIFFS)
    assert est.estimated and est.reading_time == len(steps)
    assert est.balance == balance - exact_cost(register - start, price)


@given(st.lists(st.tuples(st.integers(min_value=0, max_value=10**8), prices), min_size=4, max_size=4))
def test_per_tariff_estimates_round_once_over_all_tariffs(parts):
    a = Account("000000000001", tariff_prices={n: p for n, (_, p) in enumerate(parts, 1)}, balance=0)
    for n, (wh, _) in enumerate(parts, 1):
        a.ref[TARIFFS[n - 1]] = (1000, 0.0)
        a.latest[TARIFFS[n - 1]] = (1000 + wh, 1.0)
    exact = sum(Decimal(wh) * p for wh, p in parts) / 10**7
    assert estimate(a, TOTAL, TARIFFS).balance == -int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def test_config_thresholds_are_money_and_ordered():
    assert PrepaidConfig(trip_threshold=-50).fen("trip_threshold") == -5000
    with pytest.raises(ValueError, match="fractions of a fen"):
        PrepaidConfig(alarm_threshold=20.001)
    with pytest.raises(ValueError, match="above the alarm threshold"):
        PrepaidConfig(alarm_threshold=5, trip_threshold=10, restore_threshold=10)
    with pytest.raises(ValueError, match="extra"):
        PrepaidConfig(enabld=True)
    assert PrepaidConfig(valid_for="30m").valid_for == 1800
