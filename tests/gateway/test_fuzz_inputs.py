"""Fuzz smoke for the parsers of control and prepaid input: whatever arrives over HTTP, MQTT or a billing
CSV, the answer is a parsed request or the parser's own typed error, never another exception."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.archive import MeterConfig
from gateway.control.api import BadRequest, CommandRequest, check_address, parse_request
from gateway.prepaid import csvimport
from gateway.prepaid.config import PrepaidConfig
from gateway.prepaid.forms import parse_settings, parse_time
from gateway.prepaid.money import PrepaidError, parse_money, parse_price
from gateway.prepaid.policy import Prepaid

KEYS = st.sampled_from(["action", "request_id", "valid_for", "reason", "extra", ""])
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                   max_size=3), max_leaves=8)
ACTIONISH = st.sampled_from(["trip", "CLOSE ", "allow_close", "hold", "bogus", ""]) | JSONISH


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(KEYS, ACTIONISH | JSONISH, max_size=5) | JSONISH)
def test_command_bodies_parse_or_say_what_is_wrong(body: object) -> None:
    try:
        parsed = parse_request(body)
    except BadRequest as exc:
        assert str(exc) and exc.kind
        return
    assert isinstance(parsed, CommandRequest)
    assert parsed.valid_for is None or parsed.valid_for > 0


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=20))
def test_addresses_are_exactly_twelve_digits(text: str) -> None:
    try:
        assert check_address(text) == text and len(text) == 12 and text.isdigit()
    except BadRequest:
        assert not (len(text) == 12 and text.isascii() and text.isdigit())


class _NoJournal:
    """parse() only validates; it never touches the journal or control."""


METER = MeterConfig(address="000000000001", link="l")
PREPAID = Prepaid(PrepaidConfig(enabled=True), _NoJournal(), _NoJournal(),  # type: ignore[arg-type]
                  meters=lambda a: METER if a == METER.address else None)
CELLS = st.sampled_from(["000000000001", "1", "-5.00", "12.345", "abc", "", "2026-12-02T00:00:00+08:00",
                         "1e309", "nan", "u-1", "\"", ",", "\n"]) | st.text(max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([*csvimport.COLUMNS, "bogus"]), min_size=0, max_size=6, unique=True),
       st.lists(st.lists(CELLS, max_size=7), max_size=4), st.text(max_size=40))
def test_billing_csv_imports_or_names_the_bad_line(header: list[str], rows: list[list[str]], noise: str) -> None:
    body = "\n".join([",".join(header), *(",".join(r) for r in rows), noise])
    try:
        parsed = csvimport.parse(body, PREPAID)
    except PrepaidError as exc:
        assert "line " in str(exc) or str(exc)
        return
    assert all(row.meter == METER.address for row in parsed)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["price", "price_t1", "price_t4", "alarm_threshold", "trip_threshold",
                                        "restore_threshold", "as_of", "bogus"]), JSONISH, max_size=4),
       JSONISH)
def test_account_fields_and_amounts_parse_or_refuse(fields: dict[str, object], amount: object) -> None:
    for call in (lambda: parse_settings(fields), lambda: parse_time(fields.get("as_of")),
                 lambda: parse_money(amount, positive=True), lambda: parse_price(amount)):
        try:
            call()
        except PrepaidError as exc:
            assert str(exc)
