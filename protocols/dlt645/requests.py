"""Request builders for every function code of DL/T 645-2007 and -1997.

Each builder returns the frame bytes (optionally with an FE wake-up
preamble). Password and operator code travel together as an `Auth`, whose
repr never shows the password.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass, field

from protocols.dlt645.address import BROADCAST, WILDCARD, normalize
from protocols.dlt645.errors import EncodeError
from protocols.dlt645.formats import Time
from protocols.dlt645.frame import build
from protocols.dlt645.spec import AUTH, AUTH_1997

BAUD_CODES = {600: 0x02, 1200: 0x04, 2400: 0x08, 4800: 0x10, 9600: 0x20, 19200: 0x40}
_SYNC_TIME = Time("YYMMDDhhmmss")  # wire order ss mm hh DD MM YY
_PROFILE_START = Time("YYMMDDhhmm")  # wire order mm hh DD MM YY
REQUEST_CACHE = 32768  # plain read frames kept: two DIs of 10,000 meters, about 4 MB at most


@dataclass(frozen=True)
class Auth:
    """Password level (PA), 6-digit password and 8-digit operator code."""

    level: int = 2
    password: str = field(default="000000", repr=False)
    operator: str = "00000000"

    def __post_init__(self) -> None:
        if not 0 <= self.level <= 99:
            raise EncodeError(f"password level must be 0..99, got {self.level}")
        if len(self.password) != 6 or not (self.password.isascii() and self.password.isdigit()):
            raise EncodeError("the password must be 6 digits")
        if len(self.operator) != 8 or not (self.operator.isascii() and self.operator.isdigit()):
            raise EncodeError(f"the operator code must be 8 digits, got {self.operator!r}")

    def to_bytes(self, *, with_operator: bool = True) -> bytes:
        """PA P0 P1 P2 [C0..C3], each low byte first, as DATA before scrambling."""
        if not with_operator:
            return bytes(AUTH_1997.build({"level": self.level, "password": int(self.password)}))
        return bytes(AUTH.build({"level": self.level, "password": int(self.password),
                                 "operator": bytes.fromhex(self.operator)[::-1]}))


DEFAULT_AUTH = Auth()


def _di(di: int, edition: int) -> bytes:
    width = 2 if edition == 1997 else 4
    if not 0 <= di < 1 << (8 * width):
        raise EncodeError(f"DI {di:X} does not fit {width} bytes (DL/T 645-{edition})")
    return di.to_bytes(width, "little")


def read_request(address: str, di: int, edition: int = 2007, *, count: int | None = None,
                 start: dt.datetime | None = None, preamble: int = 0) -> bytes:
    """Read data (2007: 11, 1997: 01). `count`/`start` are the load-profile forms (L=5, L=10).

    Plain reads come from a bounded cache: a station polls the same few DIs of the same meters
    every round, and building the frame was a tenth of the gateway's CPU per transaction.
    """
    if count is None and start is None:
        return _plain_read(address, di, edition, preamble)
    return build_read_request(address, di, edition, count=count, start=start, preamble=preamble)


@functools.lru_cache(maxsize=REQUEST_CACHE)
def _plain_read(address: str, di: int, edition: int, preamble: int) -> bytes:
    return build_read_request(address, di, edition, preamble=preamble)


def build_read_request(address: str, di: int, edition: int = 2007, *, count: int | None = None,
                       start: dt.datetime | None = None, preamble: int = 0) -> bytes:
    """`read_request` without the cache."""
    data = _di(di, edition)
    if count is not None:
        if edition == 1997:
            raise EncodeError("the 1997 edition has no block-count read")
        if not 1 <= count <= 99:  # NN, BCD (verify on a meter)
            raise EncodeError(f"block count must be 1..99, got {count}")
        data += bytes((int(f"{count:02d}", 16),))
        if start is not None:
            data += _PROFILE_START.encode(start)
    elif start is not None:
        raise EncodeError("a start time needs a block count")
    return build(address, 0x01 if edition == 1997 else 0x11, data, preamble=preamble)


def read_follow_up(address: str, di: int, seq: int, edition: int = 2007, *, preamble: int = 0) -> bytes:
    """Ask for the next frame of a long answer (2007: 12 with SEQ; 1997: 02)."""
    if edition == 1997:
        return build(address, 0x02, _di(di, 1997), preamble=preamble)
    if not 0 <= seq <= 0xFF:
        raise EncodeError(f"SEQ must be 0..255, got {seq}")
    return build(address, 0x12, _di(di, 2007) + bytes((seq,)), preamble=preamble)


def reread_request(address: str, *, preamble: int = 0) -> bytes:
    """1997 03: ask the meter to send its last frame again."""
    return build(address, 0x03, b"", preamble=preamble)


def read_address_request(*, preamble: int = 0) -> bytes:
    """2007 13 to AA..AA: only sensible point-to-point (several meters would collide)."""
    return build(WILDCARD, 0x13, b"", preamble=preamble)


def write_request(address: str, di: int, value: bytes, auth: Auth = DEFAULT_AUTH, edition: int = 2007,
                  *, preamble: int = 0) -> bytes:
    """Write data (2007: 14 with operator code; 1997: 04 without)."""
    if edition == 1997:
        data = _di(di, 1997) + auth.to_bytes(with_operator=False) + value
        return build(address, 0x04, data, preamble=preamble)
    return build(address, 0x14, _di(di, 2007) + auth.to_bytes() + value, preamble=preamble)


def write_address_request(new_address: str, edition: int = 2007, *, preamble: int = 0) -> bytes:
    """Set the comm address (2007: 15 to AA..AA; 1997: 0A to 99..99)."""
    wire = bytes.fromhex(normalize(new_address))[::-1]
    if edition == 1997:
        return build(BROADCAST, 0x0A, wire, preamble=preamble)
    return build(WILDCARD, 0x15, wire, preamble=preamble)


def broadcast_time_request(when: dt.datetime, *, preamble: int = 0) -> bytes:
    """08 broadcast time sync, ss first on the wire; meters never answer it."""
    return build(BROADCAST, 0x08, _SYNC_TIME.encode(when), preamble=preamble)


def freeze_request(address: str, *, minute: int | None = None, hour: int | None = None,
                   day: int | None = None, month: int | None = None, preamble: int = 0) -> bytes:
    """16 freeze: mm hh DD MM, a None field is 99 (periodic). All None = freeze now."""
    parts = []
    for value, top in ((minute, 59), (hour, 23), (day, 31), (month, 12)):
        if value is not None and not 0 <= value <= top:
            raise EncodeError(f"freeze field {value} out of range 0..{top}")
        parts.append(0x99 if value is None else int(f"{value:02d}", 16))
    return build(address, 0x16, bytes(parts), preamble=preamble)


def change_baud_request(address: str, baud: int, edition: int = 2007, *, preamble: int = 0) -> bytes:
    """Change the port's rate (2007: 17; 1997: 0C): Z is a one-bit map."""
    if baud not in BAUD_CODES:
        raise EncodeError(f"baud must be one of {sorted(BAUD_CODES)}, got {baud}")
    return build(address, 0x0C if edition == 1997 else 0x17, bytes((BAUD_CODES[baud],)), preamble=preamble)


def change_password_request(address: str, old: Auth, new: Auth, edition: int = 2007, *,
                            preamble: int = 0) -> bytes:
    """2007 18: DI 04000C0n (n = new level) + old PA P0..P2 + new PA P0..P2; 1997 0F: old + new."""
    pair = old.to_bytes(with_operator=False) + new.to_bytes(with_operator=False)
    if edition == 1997:
        return build(address, 0x0F, pair, preamble=preamble)
    di = 0x04000C00 | (new.level + 1)
    return build(address, 0x18, _di(di, 2007) + pair, preamble=preamble)


def clear_demand_request(address: str, auth: Auth = DEFAULT_AUTH, edition: int = 2007, *,
                         preamble: int = 0) -> bytes:
    """Clear max demand (2007: 19 with operator code; 1997: 10 with password only)."""
    if edition == 1997:
        return build(address, 0x10, auth.to_bytes(with_operator=False), preamble=preamble)
    return build(address, 0x19, auth.to_bytes(), preamble=preamble)


def clear_meter_request(address: str, auth: Auth = DEFAULT_AUTH, *, preamble: int = 0) -> bytes:
    """2007 1A: clear energy, demand and events (password + operator code)."""
    return build(address, 0x1A, auth.to_bytes(), preamble=preamble)


def clear_events_request(address: str, auth: Auth = DEFAULT_AUTH, event_di: int = 0xFFFFFFFF, *,
                         preamble: int = 0) -> bytes:
    """2007 1B: clear one event's records (DI0 = FF: all records) or all (FFFFFFFF)."""
    return build(address, 0x1B, auth.to_bytes() + _di(event_di, 2007), preamble=preamble)


def output_request(address: str, output: int, *, preamble: int = 0) -> bytes:
    """2007 1D multi-function terminal: 0 second pulse, 1 demand period, 2 tariff switch."""
    if output not in (0, 1, 2):
        raise EncodeError(f"multi-function output must be 0, 1 or 2, got {output}")
    return build(address, 0x1D, bytes((output,)), preamble=preamble)
