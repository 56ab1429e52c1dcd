"""Declarative DL/T 645 structures (construct).

These are the specification of the wire layout: the link frame with its
checksum and 0x33 scrambling, and the fixed payloads of write/control
requests. Request payloads are built through them. The frame itself is
parsed and built on the hot path by `frame.py`, which the tests hold to
exactly these definitions and `bench/codec.py` measures against them.
"""

from __future__ import annotations

from typing import Any

from construct import (
    Adapter,
    Bytes,
    Checksum,
    Const,
    GreedyBytes,
    Int8ul,
    Prefixed,
    RawCopy,
    Struct,
    this,
)

from protocols.dlt645.address import from_wire, to_wire
from protocols.dlt645.frame import SCRAMBLE, UNSCRAMBLE


class _Address(Adapter):  # type: ignore[misc]
    """6 BCD bytes, low digits first <-> 12-character nameplate string."""

    def _decode(self, obj: bytes, context: Any, path: str) -> str:
        return from_wire(obj)

    def _encode(self, obj: str, context: Any, path: str) -> bytes:
        return to_wire(obj)


class _Scrambled(Adapter):  # type: ignore[misc]
    """The +0x33 layer over every DATA byte."""

    def _decode(self, obj: bytes, context: Any, path: str) -> bytes:
        return obj.translate(UNSCRAMBLE)

    def _encode(self, obj: bytes, context: Any, path: str) -> bytes:
        return bytes(obj).translate(SCRAMBLE)


class _Bcd(Adapter):  # type: ignore[misc]
    """Unsigned packed BCD, least significant byte first."""

    def _decode(self, obj: bytes, context: Any, path: str) -> int:
        return int(obj[::-1].hex())

    def _encode(self, obj: int, context: Any, path: str) -> bytes:
        width = self.subcon.sizeof()
        return bytes.fromhex(f"{obj:0{2 * width}d}")[::-1]


def _bcd(width: int) -> _Bcd:
    return _Bcd(Bytes(width))


FRAME_BODY = Struct(
    "start" / Const(b"\x68"),
    "address" / _Address(Bytes(6)),
    "start2" / Const(b"\x68"),
    "control" / Int8ul,
    "data" / Prefixed(Int8ul, _Scrambled(GreedyBytes)),
)

FRAME = Struct(
    "body" / RawCopy(FRAME_BODY),
    "checksum" / Checksum(Int8ul, lambda raw: sum(raw) & 0xFF, this.body.data),
    "end" / Const(b"\x16"),
)

# Password (level + 6 digits) and operator code, the authorisation prefix of
# 2007 write/clear/control requests.
AUTH = Struct(
    "level" / _bcd(1),
    "password" / _bcd(3),
    "operator" / Bytes(4),
)

# 1C remote control: N1 action, N2 (reserved, vendor-specific), N3..N8 the
# validity deadline ss mm hh DD MM YY.
DEADLINE = Struct(
    "second" / _bcd(1),
    "minute" / _bcd(1),
    "hour" / _bcd(1),
    "day" / _bcd(1),
    "month" / _bcd(1),
    "year" / _bcd(1),
)

CONTROL = Struct(
    "auth" / AUTH,
    "action" / Int8ul,
    "n2" / Int8ul,
    "deadline" / DEADLINE,
)

# 1997 write: DI (2) + PA P0P1P2, no operator code.
AUTH_1997 = Struct(
    "level" / _bcd(1),
    "password" / _bcd(3),
)

COMPILED_FRAME = FRAME.compile()
