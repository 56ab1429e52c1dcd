"""Schema of the data-identifier table and decoding of one item's payload.

A `DataItem` says what one DI means: the quantities (fields) it carries in
order, or, for a block DI, the member DIs whose payloads are concatenated.
The table itself is data and lives in `identifiers.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from protocols.dlt645.formats import INVALID, Format

_new = tuple.__new__


class Quantity(NamedTuple):
    """One decoded value: `value` in `unit`; `flags` name set status bits or say why a value is odd."""

    value: Any
    unit: str
    flags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Field:
    """One quantity inside an item's payload. `bits` names the bits of a binary word."""

    name: str
    fmt: Format
    unit: str = ""
    bits: tuple[str, ...] = ()

    def quantity(self, raw: bytes) -> Quantity:
        value = self.fmt.decode(raw)
        if value is INVALID:
            return Quantity(None, self.unit, ("invalid",))
        if self.bits:
            flags = tuple(name for i, name in enumerate(self.bits) if name and value >> i & 1)
            return Quantity(value, self.unit, flags)
        return _new(Quantity, (value, self.unit, ()))  # skips NamedTuple's Python-level __new__ (hot path)


@dataclass(frozen=True, slots=True)
class DataItem:
    """What one data identifier means.

    `fields` for a plain item; `members` for a block (…FF…) whose reply is the
    members' payloads back to back. A block may be answered with fewer
    members than listed (a meter with 4 tariffs answers 5 of 15 energy
    members); `fixed` blocks must be complete.
    """

    di: int
    name: str
    text: str
    fields: tuple[Field, ...] = ()
    members: tuple[int, ...] = ()
    edition: int = 2007
    equivalent: int | None = None  # the same quantity's DI in the other edition
    fixed: bool = False

    @property
    def is_block(self) -> bool:
        return bool(self.members)

    @property
    def width(self) -> int | None:
        """Payload length in bytes, None for a block (it depends on the meter)."""
        if self.members:
            return None
        return sum(f.fmt.width for f in self.fields)

    def di_text(self) -> str:
        return f"{self.di:0{4 if self.edition == 1997 else 8}X}"


class Decoded(NamedTuple):
    values: dict[str, Quantity]
    complete: bool  # False when the payload length differed from the table


def decode_fields(fields: tuple[Field, ...], payload: bytes) -> Decoded:
    values: dict[str, Quantity] = {}
    pos = 0
    for f in fields:
        end = pos + f.fmt.width
        if end > len(payload):
            return Decoded(values, False)
        values[f.name] = f.quantity(payload[pos:end])
        pos = end
    return Decoded(values, pos == len(payload))
