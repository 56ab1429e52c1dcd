"""The meter's side: understanding requests and building replies.

Used by the simulator and by tests; the gateway only needs `requests`/`replies`.
"""

from __future__ import annotations

from typing import NamedTuple

from protocols.dlt645.errors import DecodeError
from protocols.dlt645.frame import Frame, build
from protocols.dlt645.replies import FUNCTIONS_1997

MAX_REPLY_DATA = 200  # the standard's limit for a read reply; longer answers use follow-up frames


class Request(NamedTuple):
    """A master's request as a meter sees it. `di` is None for functions without one."""

    address: str
    function: int
    edition: int
    di: int | None
    seq: int | None
    body: bytes  # DATA after the DI (and without SEQ)


def parse_request(frame: Frame, edition: int | None = None) -> Request:
    """Split a request frame into function, DI and body. DecodeError for replies or short DIs."""
    if frame.control & 0x80:
        raise DecodeError(f"C={frame.control:02X} is a reply, not a request")
    function = frame.control & 0x1F
    ed = edition or (1997 if function in FUNCTIONS_1997 else 2007)
    data = frame.data
    if ed == 2007 and function == 0x11 and len(data) == 2:
        ed = 1997  # a known library quirk: 1997 DI sent with the 2007 read code (peace0phmind/dlt645)
    width = 2 if ed == 1997 else 4
    with_di = {0x11, 0x12, 0x14, 0x18} if ed == 2007 else {0x01, 0x02, 0x04, 0x11}
    if function not in with_di:
        return Request(frame.address, function, ed, None, None, data)
    if len(data) < width:
        raise DecodeError(f"function {function:02X} needs a {width}-byte DI, got {len(data)} bytes")
    di = int.from_bytes(data[:width], "little")
    body = data[width:]
    if ed == 2007 and function == 0x12:
        if len(body) != 1:
            raise DecodeError("a follow-up read carries DI + SEQ")
        return Request(frame.address, function, ed, di, body[0], b"")
    return Request(frame.address, function, ed, di, None, body)


def normal_reply(address: str, function: int, data: bytes = b"", *, more: bool = False,
                 preamble: int = 0) -> bytes:
    """C = function | 0x80 (| 0x20 when follow-up frames exist)."""
    return build(address, function | 0x80 | (0x20 if more else 0), data, preamble=preamble)


def read_reply(address: str, di: int, payload: bytes, edition: int = 2007, *, preamble: int = 0) -> list[bytes]:
    """A read answer, split into follow-up frames when it exceeds 200 data bytes.

    2007: the first frame is 91/B1 with DI + data; follow-ups are 92/B2 with
    DI + data + SEQ (they are sent one per 12 request; SEQ = request's SEQ).
    1997: 81/A1 then 82/A2 with DI + data.
    """
    width = 2 if edition == 1997 else 4
    di_bytes = di.to_bytes(width, "little")
    first_room = MAX_REPLY_DATA - width
    parts = [payload[:first_room]]
    rest = payload[first_room:]
    room = MAX_REPLY_DATA - width - (1 if edition == 2007 else 0)
    while rest:
        parts.append(rest[:room])
        rest = rest[room:]
    read, follow = (0x01, 0x02) if edition == 1997 else (0x11, 0x12)
    frames = []
    for k, part in enumerate(parts):
        more = k < len(parts) - 1
        if k == 0:
            frames.append(normal_reply(address, read, di_bytes + part, more=more, preamble=preamble))
        else:
            seq = bytes((k,)) if edition == 2007 else b""
            frames.append(normal_reply(address, follow, di_bytes + part + seq, more=more, preamble=preamble))
    return frames


def error_reply(address: str, function: int, err: int, *, preamble: int = 0) -> bytes:
    """C = function | 0xC0 with the ERR bit set."""
    return build(address, function | 0xC0, bytes((err & 0xFF,)), preamble=preamble)
