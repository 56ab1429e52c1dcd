"""Meter addresses: the 12-digit nameplate string and its 6 wire bytes.

On the wire the address is BCD with the lowest two digits first; `A` stands
for a wildcard nibble (0xA) so abbreviated addressing (high bytes AA) and the
all-wildcard AAAAAAAAAAAA address round-trip as text.
"""

from __future__ import annotations

import re

from protocols.dlt645.errors import AddressError

BROADCAST = "999999999999"
WILDCARD = "AAAAAAAAAAAA"

_ADDRESS_RE = re.compile(r"[0-9Aa]{1,12}")


def normalize(address: str) -> str:
    """Return the canonical 12-character form: digits, upper-case A, zero padded.

    Shorter inputs are padded with leading zeros (short nameplate numbers);
    spaces are ignored so copied nameplates work.
    """
    text = address.replace(" ", "")
    if not _ADDRESS_RE.fullmatch(text):
        raise AddressError(f"meter address must be up to 12 digits (A = wildcard), got {address!r}")
    return text.upper().rjust(12, "0")


def abbreviated(address: str) -> str:
    """Abbreviated addressing (缩位寻址): keep the significant low digits, wildcard the rest.

    `abbreviated("123456789")` is `"AAA123456789"`: the leading nibble of an odd
    digit count becomes a wildcard too, as in the public Go implementations.
    """
    text = address.replace(" ", "").lstrip("0") or "0"
    if not text.isdigit() or len(text) > 12:
        raise AddressError(f"abbreviated address needs up to 12 digits, got {address!r}")
    return text.rjust(12, "A")


_HEX12 = re.compile(r"[0-9A-Fa-f]{12}")


def to_wire(address: str) -> bytes:
    """Nameplate string -> 6 wire bytes (lowest digits first).

    Besides what `normalize` accepts, any 12 hex digits pass, so an address
    read off the wire with odd nibbles (from_wire keeps them) builds back.
    """
    if _HEX12.fullmatch(address):
        return bytes.fromhex(address)[::-1]
    return bytes.fromhex(normalize(address))[::-1]


def from_wire(raw: bytes) -> str:
    """6 wire bytes -> nameplate string. Non-BCD nibbles other than A are kept as hex."""
    if len(raw) != 6:
        raise AddressError(f"an address is 6 bytes, got {len(raw)}")
    return raw[::-1].hex().upper()


def is_broadcast(address: str) -> bool:
    return normalize(address) == BROADCAST


def is_wildcard(address: str) -> bool:
    return "A" in normalize(address)


def matches(pattern: str, address: str) -> bool:
    """True when `address` is selected by `pattern` (wildcard nibbles match any digit).

    Never raises: an address that is not 12 characters matches nothing.
    """
    if len(pattern) != 12 or len(address) != 12:
        return False
    return all(p in ("A", "a", a) for p, a in zip(pattern, address, strict=True))
