"""Money, prices and energy as integers, so balances never drift and the database holds no floats.

Money is integer fen (1/100 of the currency unit). A price is integer micro-units per kWh
(0.528300 CNY/kWh = 528300), fine enough for any published tariff. Energy registers are
integer Wh. The cost of `wh` at `price` is exactly wh * price / 10**7 fen, rounded once,
half up, at the end of a sum, so an estimate depends only on its two register readings
and never on how many readings came in between.
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation

FEN = 100  # fen per currency unit
MICRO = 10**6  # price units per currency unit
COST_DIVISOR = 10**7  # Wh x micro/kWh -> fen: / 1000 (Wh->kWh) / 10**6 (micro->unit) * 100 (unit->fen)
MAX_MONEY = 10**8 * FEN  # 100 million: anything bigger is a typo or a unit mistake
MAX_PRICE = 100 * MICRO  # 100 per kWh


class PrepaidError(ValueError):
    """Bad input or an impossible request; `status` is the HTTP status the API answers with."""

    status = 400


class UnknownAccount(PrepaidError):
    status = 404


class UnknownMeter(PrepaidError):
    status = 404


class Conflict(PrepaidError):
    """An idempotency key reused for something else."""

    status = 409


def _decimal(value: object, what: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise PrepaidError(f"{what} must be a number, got {value!r}")
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise PrepaidError(f"{what} must be a number, got {value!r}") from None
    if not number.is_finite():
        raise PrepaidError(f"{what} must be a finite number, got {value!r}")
    return number


def parse_money(value: object, what: str = "amount", *, positive: bool = False) -> int:
    """A JSON/CSV/TOML amount (number or decimal string) -> fen. Fractions of a fen are refused, not rounded."""
    number = _decimal(value, what) * FEN
    if number != number.to_integral_value():
        raise PrepaidError(f"{what} has fractions of a fen: {value!r} (at most 2 decimals)")
    fen = int(number)
    if abs(fen) > MAX_MONEY:
        raise PrepaidError(f"{what} is out of range: {value!r}")
    if positive and fen <= 0:
        raise PrepaidError(f"{what} must be more than 0, got {value!r}")
    return fen


def parse_price(value: object, what: str = "price") -> int:
    """A price per kWh -> micro-units; at most 6 decimals, 0 <= price <= 100."""
    number = _decimal(value, what) * MICRO
    if number != number.to_integral_value():
        raise PrepaidError(f"{what} has more than 6 decimals: {value!r}")
    micro = int(number)
    if not 0 <= micro <= MAX_PRICE:
        raise PrepaidError(f"{what} must be between 0 and 100 per kWh, got {value!r}")
    return micro


def format_money(fen: int | None) -> str | None:
    """Fen -> "12.34" / "-0.05" (a string: JSON numbers would invite float arithmetic)."""
    if fen is None:
        return None
    sign = "-" if fen < 0 else ""
    whole, part = divmod(abs(fen), FEN)
    return f"{sign}{whole}.{part:02d}"


def format_price(micro: int | None) -> str | None:
    """Micro-units -> "0.5283" (trailing zeros trimmed to at least 2 decimals)."""
    if micro is None:
        return None
    whole, part = divmod(micro, MICRO)
    digits = f"{part:06d}".rstrip("0").ljust(2, "0")
    return f"{whole}.{digits}"


def energy_wh(value: object) -> int | None:
    """A register reading in kWh (as the DI table decodes it) -> integer Wh; None if it is not a register value."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return round(Decimal(str(value)) * 1000)


def cost_fen(weighted: int) -> int:
    """The cost of sum(Wh x micro/kWh), in fen, rounded half up once."""
    return (weighted + COST_DIVISOR // 2) // COST_DIVISOR
