"""Outside input (a JSON body, a CSV row, an MQTT payload) -> typed requests, with errors that say which field.

One place for the field names and their rules, so the API, the CSV import and MQTT accept
exactly the same things: money with at most 2 decimals, prices with at most 6, thresholds
as money (null resets an account's override to the configured default), times as epoch
seconds or ISO 8601 with an offset.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from typing import Any

from gateway.prepaid.ledger import Settings
from gateway.prepaid.money import PrepaidError, parse_money, parse_price

TARIFF_FIELDS = ("price_t1", "price_t2", "price_t3", "price_t4")
THRESHOLDS = {"alarm_threshold": "alarm", "trip_threshold": "trip", "restore_threshold": "restore"}
SETTING_FIELDS = ("price", *TARIFF_FIELDS, "tariff_prices", *THRESHOLDS)


def _empty(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def parse_settings(fields: Mapping[str, Any]) -> Settings | None:
    """The settings fields present in `fields` (others are ignored by the caller); None if there are none."""
    values: dict[str, Any] = {}
    if "price" in fields:
        values["price"] = None if _empty(fields["price"]) else parse_price(fields["price"], "price")
    tariffs: dict[int, int] = {}
    given = False
    if "tariff_prices" in fields:
        given = True
        raw = fields["tariff_prices"]
        if raw is not None and not isinstance(raw, Mapping):
            raise PrepaidError('tariff_prices must be an object like {"1": 0.62, "2": 0.31}')
        for key, value in (raw or {}).items():
            if str(key) not in {"1", "2", "3", "4"}:
                raise PrepaidError(f"tariff_prices: tariff {key!r} is not 1-4")
            if not _empty(value):
                tariffs[int(key)] = parse_price(value, f"tariff_prices[{key}]")
    for n, name in enumerate(TARIFF_FIELDS, 1):
        if name in fields:
            given = True
            if not _empty(fields[name]):
                tariffs[n] = parse_price(fields[name], name)
    if given:
        values["tariff_prices"] = tariffs
    if values.get("price") is not None and tariffs:
        raise PrepaidError("give either a flat price or per-tariff prices (price_t1..price_t4), not both")
    for name, attr in THRESHOLDS.items():
        if name in fields:
            values[attr] = None if _empty(fields[name]) else parse_money(fields[name], name)
    return Settings(**values) if values else None


def parse_time(value: object, what: str = "as_of") -> float | None:
    """Epoch seconds, or ISO 8601 with an offset ("2024-05-01T00:00:00+08:00"); None/"" = now."""
    if _empty(value):
        return None
    if isinstance(value, bool):
        raise PrepaidError(f"{what} must be epoch seconds or an ISO 8601 time, got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise PrepaidError(f"{what} must be a time, got {value!r}")
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise PrepaidError(f"{what} must be epoch seconds or an ISO 8601 time, got {value!r}") from None
    if when.tzinfo is None:
        raise PrepaidError(f"{what} needs a UTC offset (e.g. {text}+08:00), got {value!r}")
    return when.timestamp()


def text(fields: Mapping[str, Any], name: str, *, required: bool = True) -> str:
    """A string field (an id); required ones must be non-empty."""
    value = fields.get(name)
    if _empty(value):
        if required:
            raise PrepaidError(f"{name} is required")
        return ""
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise PrepaidError(f"{name} must be a string, got {value!r}")
    return str(value).strip()


def unknown(fields: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    extra = sorted(set(fields) - set(allowed))
    if extra:
        raise PrepaidError(f"unknown field(s) {', '.join(map(repr, extra))}; expected some of {', '.join(allowed)}")


def settings_or_empty(fields: Mapping[str, Any]) -> Settings:
    settings = parse_settings(fields)
    if settings is None:
        raise PrepaidError(f"nothing to change: give some of {', '.join(SETTING_FIELDS)}")
    return settings
