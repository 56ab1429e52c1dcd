"""Value formats of DL/T 645 data: BCD with implied decimals, signed BCD,
binary bit words, digit strings, ASCII and date/time patterns.

Every multi-byte value goes on the wire least significant byte first. A
format decodes exactly its own width; the caller slices. Decoding never
raises on meter data: a value the format cannot represent (non-BCD nibbles,
an all-zero "no record yet" time) decodes to `INVALID` and the caller flags it.
Encoding raises `EncodeError` for values that do not fit.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from protocols.dlt645.errors import EncodeError


class _Invalid:
    """Marker for a value the meter sent but that has no meaning (e.g. FF FF, 00-00 dates)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "INVALID"

    def __bool__(self) -> bool:
        return False


INVALID: Any = _Invalid()


class Format:
    """Base class: a fixed-width value codec."""

    __slots__ = ("width",)
    kind = "raw"

    def __init__(self, width: int) -> None:
        self.width = width

    def decode(self, raw: bytes) -> Any:
        return raw[::-1].hex().upper()

    def encode(self, value: Any) -> bytes:
        if isinstance(value, bytes | bytearray):
            data = bytes(value)
        else:
            try:
                data = bytes.fromhex(str(value))[::-1]
            except ValueError as exc:
                raise EncodeError(f"raw value must be hex, got {value!r}") from exc
        if len(data) != self.width:
            raise EncodeError(f"raw value must be {self.width} bytes, got {len(data)}")
        return data

    def describe(self) -> str:
        return f"{self.kind}({self.width})"

    def __repr__(self) -> str:
        return self.describe()


class Raw(Format):
    """Bytes we have no meaning for: shown as hex in nameplate (most significant first) order."""

    __slots__ = ()


class Bcd(Format):
    """Packed BCD, low byte first, `decimals` implied; `signed` = sign in the top bit."""

    __slots__ = ("_scale", "decimals", "real", "signed")
    kind = "bcd"

    def __init__(self, width: int, decimals: int = 0, *, signed: bool = False, real: bool | None = None) -> None:
        super().__init__(width)
        if decimals and real is False:
            raise ValueError("a BCD format with decimals decodes to a float; real=False cannot hold them")
        self.decimals = decimals
        self.signed = signed
        # A physical quantity is a float even with no decimals (1997 volts), so a field's type never changes.
        self.real = bool(decimals) if real is None else real
        self._scale = 10**decimals

    def decode(self, raw: bytes) -> Any:
        text = raw[::-1].hex()
        negative = False
        if self.signed and raw[-1] & 0x80:
            negative = True
            text = f"{raw[-1] & 0x7F:02x}{text[2:]}"
        if not text.isdigit():
            return INVALID
        number = int(text)
        if negative:
            number = -number
        if self.real:
            return number / self._scale
        return number

    def encode(self, value: Any) -> bytes:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise EncodeError(f"a BCD value must be a finite number, got {value!r}")
        number = round(value * self._scale)
        negative = number < 0
        if negative and not self.signed:
            raise EncodeError(f"{value} is negative but the format is unsigned")
        digits = f"{abs(number):0{2 * self.width}d}"
        if len(digits) > 2 * self.width or (self.signed and digits[0] > "7"):
            raise EncodeError(f"{value} does not fit {self.describe()}")
        data = bytearray(bytes.fromhex(digits)[::-1])
        if negative:
            data[-1] |= 0x80
        return bytes(data)

    def describe(self) -> str:
        digits = 2 * self.width - self.decimals
        pattern = "X" * digits + ("." + "X" * self.decimals if self.decimals else "")
        return ("S" if self.signed else "") + pattern


class Digits(Format):
    """A BCD digit string such as an address or meter number (kept as text, leading zeros)."""

    __slots__ = ()
    kind = "digits"

    def decode(self, raw: bytes) -> Any:
        text = raw[::-1].hex().upper()
        return text if text.isdigit() else INVALID

    def encode(self, value: Any) -> bytes:
        text = str(value).rjust(2 * self.width, "0")
        if not (text.isascii() and text.isdigit()) or len(text) != 2 * self.width:
            raise EncodeError(f"{value!r} is not {2 * self.width} digits")
        return bytes.fromhex(text)[::-1]

    def describe(self) -> str:
        return "N" * (2 * self.width)


class Binary(Format):
    """An unsigned binary word, low byte first: status and feature words (bits are named in the table)."""

    __slots__ = ()
    kind = "binary"

    def decode(self, raw: bytes) -> Any:
        return int.from_bytes(raw, "little")

    def encode(self, value: Any) -> bytes:
        try:
            return int(value).to_bytes(self.width, "little")
        except (OverflowError, TypeError, ValueError) as exc:
            raise EncodeError(f"{value!r} does not fit {self.width} binary bytes") from exc

    def describe(self) -> str:
        return f"bits{8 * self.width}"


class Ascii(Format):
    """ASCII text, sent reversed like every other field; NUL and space padding stripped."""

    __slots__ = ()
    kind = "ascii"

    def decode(self, raw: bytes) -> Any:
        return raw[::-1].decode("ascii", "replace").strip("\x00 \xff")

    def encode(self, value: Any) -> bytes:
        try:
            data = str(value).encode("ascii")
        except UnicodeEncodeError as exc:
            raise EncodeError(f"{value!r} is not ASCII") from exc
        if len(data) > self.width:
            raise EncodeError(f"{value!r} is longer than {self.width} characters")
        return data.rjust(self.width, b"\x00")[::-1]

    def describe(self) -> str:
        return f"ascii{self.width}"


# Date/time patterns in the standard's notation (most significant first).
_FIELDS = ("YY", "MM", "DD", "WW", "hh", "mm", "ss")


class Time(Format):
    """A BCD date/time pattern such as YYMMDDhhmm, hhmmss or YYMMDDWW.

    Decodes to `datetime` when the pattern has a year and a time, `date` for
    dates, `time` for times of day, and "MM-DD hh:mm"-style text for the
    year-less parameter patterns (MMDDhhmm, DDhh). A time the meter leaves
    at zero (no record yet) decodes to INVALID.
    """

    __slots__ = ("parts", "pattern")
    kind = "time"

    def __init__(self, pattern: str) -> None:
        parts = tuple(pattern[i : i + 2] for i in range(0, len(pattern), 2))
        if any(p not in _FIELDS for p in parts) or 2 * len(parts) != len(pattern):
            raise ValueError(f"unknown time pattern {pattern!r}")
        super().__init__(len(parts))
        self.pattern = pattern
        self.parts = parts

    def decode(self, raw: bytes) -> Any:
        text = raw[::-1].hex()
        if not text.isdigit():
            return INVALID
        got = {p: int(text[2 * i : 2 * i + 2]) for i, p in enumerate(self.parts)}
        try:
            if "YY" in got:
                year = 2000 + got["YY"]
                if "hh" in got:
                    return dt.datetime(year, got["MM"], got["DD"], got["hh"], got.get("mm", 0), got.get("ss", 0))
                return dt.date(year, got["MM"], got.get("DD", 1))
            if "MM" not in got and "DD" not in got:
                return dt.time(got["hh"], got.get("mm", 0), got.get("ss", 0))
        except ValueError:
            return INVALID
        return self._partial(got)

    def _partial(self, got: dict[str, int]) -> Any:
        month, day, hour = got.get("MM"), got.get("DD"), got.get("hh")
        if (month is not None and not 1 <= month <= 12) or (day is not None and not 1 <= day <= 31):
            return INVALID
        if hour is not None and hour > 23:
            return INVALID
        date = "-".join(f"{got[p]:02d}" for p in ("MM", "DD") if p in got)
        clock = ":".join(f"{got[p]:02d}" for p in ("hh", "mm", "ss") if p in got)
        return f"{date} {clock}".strip()

    def encode(self, value: Any) -> bytes:
        if isinstance(value, dt.datetime):
            fields = {"YY": value.year - 2000, "MM": value.month, "DD": value.day, "hh": value.hour,
                      "mm": value.minute, "ss": value.second, "WW": value.isoweekday() % 7}
        elif isinstance(value, dt.date):
            fields = {"YY": value.year - 2000, "MM": value.month, "DD": value.day, "hh": 0, "mm": 0,
                      "ss": 0, "WW": value.isoweekday() % 7}
        elif isinstance(value, dt.time):
            fields = {"hh": value.hour, "mm": value.minute, "ss": value.second}
        else:
            raise EncodeError(f"{self.pattern} needs a date or time, got {value!r}")
        try:
            text = "".join(f"{fields[p]:02d}" for p in self.parts)
        except KeyError as exc:
            raise EncodeError(f"{self.pattern} needs a date and a time, got {value!r}") from exc
        if not 0 <= fields.get("YY", 0) <= 99:
            raise EncodeError(f"year {value!r} is outside 2000..2099")
        return bytes.fromhex(text)[::-1]

    def describe(self) -> str:
        return self.pattern
