"""The DL/T 645 link frame: ``[FE..] 68 A0..A5 68 C L DATA CS 16``.

The frame is defined declaratively in `protocols.dlt645.spec` (construct); this
module holds the hand-tuned hot path that `bench/codec.py` measures against it
and that the tests check against it byte for byte. Both editions (1997 and
2007) share this layer; only the meaning of C and DATA differs.
"""

from __future__ import annotations

from typing import NamedTuple

from protocols.dlt645.address import from_wire, to_wire
from protocols.dlt645.errors import (
    BadChecksum,
    BadEnd,
    BadStart,
    EncodeError,
    TrailingBytes,
    TruncatedFrame,
)

START = 0x68
END = 0x16
PREAMBLE = 0xFE
MIN_FRAME = 12
MAX_DATA = 255

# Control byte bits.
DIRECTION_BIT = 0x80  # 1 = sent by the meter
ABNORMAL_BIT = 0x40  # 1 = abnormal reply, DATA is the ERR byte
FOLLOW_BIT = 0x20  # 1 = more frames follow (read follow-up)
FUNCTION_MASK = 0x1F

SCRAMBLE = bytes((b + 0x33) & 0xFF for b in range(256))
UNSCRAMBLE = bytes((b - 0x33) & 0xFF for b in range(256))


class Frame(NamedTuple):
    """One link frame with its DATA already descrambled (0x33 removed)."""

    address: str
    control: int
    data: bytes

    @property
    def function(self) -> int:
        return self.control & FUNCTION_MASK

    @property
    def is_reply(self) -> bool:
        """Direction bit: True when the meter sent this frame."""
        return bool(self.control & DIRECTION_BIT)

    @property
    def is_abnormal(self) -> bool:
        return bool(self.control & ABNORMAL_BIT)

    @property
    def has_more(self) -> bool:
        """Follow-up flag: the meter has more frames for this request."""
        return bool(self.control & FOLLOW_BIT)

    def to_bytes(self, preamble: int = 0) -> bytes:
        return build(self.address, self.control, self.data, preamble=preamble)


def checksum(body: bytes | bytearray | memoryview) -> int:
    return sum(body) & 0xFF


def build(address: str, control: int, data: bytes = b"", *, preamble: int = 0) -> bytes:
    """Encode one frame; `data` is plain (this function adds the 0x33)."""
    if not 0 <= control <= 0xFF:
        raise EncodeError(f"control byte out of range: {control}")
    if len(data) > MAX_DATA:
        raise EncodeError(f"DATA is {len(data)} bytes; a frame carries at most {MAX_DATA}")
    body = b"\x68" + to_wire(address) + bytes((START, control, len(data))) + data.translate(SCRAMBLE)
    return b"\xfe" * preamble + body + bytes((sum(body) & 0xFF, END))


def parse(data: bytes | bytearray | memoryview) -> Frame:
    """Parse exactly one frame, tolerating FE before and after it.

    Raises a `FrameError` subclass for anything else; never another exception.
    """
    raw = bytes(data)
    i = len(raw) - len(raw.lstrip(b"\xfe"))
    n = len(raw)
    if n - i < MIN_FRAME:
        raise TruncatedFrame(f"{n - i} bytes after the preamble; a frame has at least {MIN_FRAME}", raw)
    if raw[i] != START:
        raise BadStart(f"expected 68 at offset {i}, found {raw[i]:02X}", raw)
    if raw[i + 7] != START:
        raise BadStart(f"expected the second 68 at offset {i + 7}, found {raw[i + 7]:02X}", raw)
    end = i + 10 + raw[i + 9]
    if n < end + 2:
        raise TruncatedFrame(f"L={raw[i + 9]} needs {end + 2 - i} bytes, got {n - i}", raw)
    cs = sum(raw[i:end]) & 0xFF
    if cs != raw[end]:
        raise BadChecksum(
            f"checksum {raw[end]:02X} does not match computed {cs:02X}", raw, expected=cs, found=raw[end]
        )
    if raw[end + 1] != END:
        raise BadEnd(f"expected 16 after the checksum, found {raw[end + 1]:02X}", raw)
    if end + 2 != n and raw[end + 2 :].strip(b"\xfe"):
        raise TrailingBytes(f"{n - end - 2} bytes after the end of the frame", raw)
    wire = raw[i + 1 : i + 7]
    address = _ADDRESSES.get(wire)
    if address is None:
        address = remember_address(wire)
    return _new(Frame, (address, raw[i + 8], raw[i + 10 : end].translate(UNSCRAMBLE)))


_new = tuple.__new__
_ADDRESSES: dict[bytes, str] = {}
_ADDRESS_CACHE = 1 << 17  # a station has thousands of meters; the bound only guards against noise


def remember_address(wire: bytes) -> str:
    """Wire bytes -> nameplate string, cached: converting it is a third of the parse time."""
    if len(_ADDRESSES) >= _ADDRESS_CACHE:
        _ADDRESSES.clear()
    address = _ADDRESSES[wire] = from_wire(wire)
    return address
