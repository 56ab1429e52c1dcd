"""Reply decoding: a meter's frame -> `Reply` with typed values or decoded error bits."""

from __future__ import annotations

from collections.abc import Callable
from enum import IntFlag
from typing import NamedTuple

from protocols.dlt645.errors import DecodeError
from protocols.dlt645.frame import Frame
from protocols.dlt645.identifiers import TABLE_2007, lookup
from protocols.dlt645.items import DataItem, Decoded, Quantity, decode_fields

# Function codes that exist only in the 1997 edition (03 is 1997 re-read; 2007 reuses it for security).
FUNCTIONS_1997 = frozenset({0x01, 0x02, 0x03, 0x04, 0x0A, 0x0C, 0x0F, 0x10})
READS = {2007: (0x11, 0x12), 1997: (0x01, 0x02, 0x03)}
DI_WIDTH = {2007: 4, 1997: 2}
FUNCTION_NAMES = {
    2007: {0x03: "security", 0x08: "broadcast_time", 0x11: "read", 0x12: "read_follow_up", 0x13: "read_address",
           0x14: "write", 0x15: "write_address", 0x16: "freeze", 0x17: "change_baud", 0x18: "change_password",
           0x19: "clear_demand", 0x1A: "clear_meter", 0x1B: "clear_events", 0x1C: "control",
           0x1D: "multi_function_output"},
    1997: {0x01: "read", 0x02: "read_follow_up", 0x03: "reread", 0x04: "write", 0x08: "broadcast_time",
           0x0A: "write_address", 0x0C: "change_baud", 0x0F: "change_password", 0x10: "clear_demand"},
}
_new = tuple.__new__
BAUD_BITS = {0x02: 600, 0x04: 1200, 0x08: 2400, 0x10: 4800, 0x20: 9600, 0x40: 19200}


class Error2007(IntFlag):
    """ERR byte of a 2007 abnormal reply: a bit set, not an enum (bits combine)."""

    OTHER = 0x01
    NO_DATA = 0x02
    UNAUTHORIZED = 0x04
    BAUD_FIXED = 0x08
    YEAR_ZONES_EXCEEDED = 0x10
    DAY_SLOTS_EXCEEDED = 0x20
    TARIFFS_EXCEEDED = 0x40
    RESERVED_7 = 0x80


class Error1997(IntFlag):
    """ERR byte of a 1997 abnormal reply; bits 0 and 1 mean something else than in 2007."""

    ILLEGAL_DATA = 0x01
    BAD_DI = 0x02
    BAD_PASSWORD = 0x04
    RESERVED_3 = 0x08
    YEAR_ZONES_EXCEEDED = 0x10
    DAY_SLOTS_EXCEEDED = 0x20
    TARIFFS_EXCEEDED = 0x40
    RESERVED_7 = 0x80


def error_names(error: IntFlag) -> list[str]:
    return [flag.name.lower() for flag in type(error) if flag & error and flag.name]


class Reply(NamedTuple):
    """A decoded frame from a meter.

    `values` maps quantity names to `Quantity`; `error` is set for abnormal
    replies; `more` is the follow-up flag; `complete` is False when the
    payload length differed from the table (tolerated, flagged).
    """

    address: str
    control: int
    edition: int
    di: int | None = None
    values: dict[str, Quantity] = {}  # noqa: RUF012  (a NamedTuple default; never mutated)
    error: IntFlag | None = None
    more: bool = False
    seq: int | None = None
    payload: bytes = b""
    item: DataItem | None = None
    complete: bool = True

    @property
    def function(self) -> int:
        return self.control & 0x1F

    @property
    def ok(self) -> bool:
        return self.error is None


def edition_of(frame: Frame) -> int:
    return 1997 if frame.control & 0x1F in FUNCTIONS_1997 else 2007


def decode(frame: Frame, edition: int | None = None, *, tariffs: int = 4) -> Reply:
    """Decode a reply frame. Raises `DecodeError` for a request frame or a short DI.

    `edition` defaults to what the function code says; `tariffs` is how many
    tariff members a nested block of a whole freeze record holds.
    """
    address, control, data = frame
    # Fast path: a 2007 single-frame read reply of a one-value item, the bulk of all traffic.
    if control == 0x91 and edition != 1997 and len(data) >= 4:
        di = int.from_bytes(data[:4], "little")
        item = TABLE_2007.get(di)
        if item is not None and len(item.fields) == 1:
            payload = data[4:]
            field = item.fields[0]
            if len(payload) == field.fmt.width:
                values = {field.name: field.quantity(payload)}
                return _new(Reply, (address, control, 2007, di, values, None, False, None, payload, item, True))
        elif item is not None and item.members:  # a block read in one frame (energy, voltages)
            payload = data[4:]
            values, used, complete = _block(item, payload, 2007, tariffs, nested=False)
            return _new(Reply, (address, control, 2007, di, values, None, False, None, payload, item,
                                complete and used == len(payload)))
    return _decode(frame, edition or edition_of(frame), tariffs)


def _decode(frame: Frame, ed: int, tariffs: int) -> Reply:
    address, control, data = frame
    if not control & 0x80:
        raise DecodeError(f"C={control:02X} is a request (direction bit clear), not a reply")
    function = control & 0x1F
    if control & 0x40:
        if not data:
            raise DecodeError(f"abnormal reply C={control:02X} carries no ERR byte")
        err: IntFlag = Error1997(data[0]) if ed == 1997 else Error2007(data[0])
        return Reply(address, control, ed, error=err, payload=data)
    more = bool(control & 0x20)
    if function in READS[ed]:
        width = DI_WIDTH[ed]
        if len(data) < width:
            raise DecodeError(f"read reply with {len(data)} data bytes has no DI")
        di = int.from_bytes(data[:width], "little")
        seq = None
        payload = data[width:]
        if function == 0x12 and ed == 2007 and payload:  # 1997 follow-ups (02) carry no SEQ
            seq, payload = payload[-1], payload[:-1]
        item = lookup(di, ed)
        if more or seq is not None:  # part of a multi-frame answer: the caller joins payloads (ReadSequence)
            return Reply(address, control, ed, di, {}, None, more, seq, payload, item, True)
        decoded = decode_item(item, di, payload, ed, tariffs)
        return Reply(address, control, ed, di, decoded.values, None, more, seq, payload, item, decoded.complete)
    values: dict[str, Quantity] = {}
    if function == 0x13 and len(data) == 6:
        values["address"] = Quantity(data[::-1].hex().upper(), "")
    elif function in (0x17, 0x0C) and len(data) == 1:
        values["baud"] = Quantity(BAUD_BITS.get(data[0]), "Bd", () if data[0] in BAUD_BITS else ("invalid",))
    elif function == 0x1D and len(data) == 1:
        values["output"] = Quantity(data[0], "")
    elif function == 0x18 and data:
        values["password_level"] = Quantity(data[0], "")
    return Reply(address, control, ed, values=values, more=more, payload=data)


def decode_data(di: int, payload: bytes, edition: int = 2007, *, tariffs: int = 4) -> Decoded:
    """Decode a read reply's payload (after the DI, e.g. joined follow-up frames)."""
    return decode_item(lookup(di, edition), di, payload, edition, tariffs)


def decode_item(item: DataItem | None, di: int, payload: bytes, edition: int, tariffs: int) -> Decoded:
    if item is None:
        name = f"{di:0{2 * DI_WIDTH[edition]}X}"
        return Decoded({name: Quantity(payload.hex().upper(), "", ("raw",))}, True)
    if item.fields:
        return decode_fields(item.fields, payload)
    if not item.members:  # opaque item (load profile): keep the bytes
        return Decoded({item.name: Quantity(payload.hex().upper(), "", ("raw",))}, True)
    values, used, complete = _block(item, payload, edition, tariffs, nested=False)
    return Decoded(values, complete and used == len(payload))


# One field of a flat block: its name, where it starts and ends in the payload, and how to decode it.
Slot = tuple[str, int, int, Callable[[bytes], Quantity]]
# Per member of a flat block: the payload offset where the member ends, and its fields.
Layout = tuple[tuple[int, tuple[Slot, ...]], ...]
_LAYOUTS: dict[tuple[int, int, int], Layout | None] = {}  # (block DI, edition, members used) -> layout


def _layout(item: DataItem, members: tuple[int, ...], edition: int) -> Layout | None:
    """Where every field of a block of plain, known members sits; None for nested or unknown members.

    The table is data that never changes, so this is worked out once per block and member count,
    not per reply (the member lookups and width sums were most of a block decode)."""
    key = (item.di, edition, len(members))
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    layout: list[tuple[int, tuple[Slot, ...]]] = []
    pos = 0
    for di in members:
        member = lookup(di, edition)
        if member is None or member.members:
            _LAYOUTS[key] = None
            return None
        slots = []
        for f in member.fields:
            slots.append((f.name, pos, pos + f.fmt.width, f.quantity))
            pos += f.fmt.width
        layout.append((pos, tuple(slots)))
    _LAYOUTS[key] = result = tuple(layout)
    return result


def _block(item: DataItem, payload: bytes, edition: int, tariffs: int, *,
           nested: bool) -> tuple[dict[str, Quantity], int, bool]:
    """Decode the members back to back; an open-ended block stops when the payload does."""
    values: dict[str, Quantity] = {}
    members = item.members if item.fixed or not nested else item.members[: tariffs + 1]
    layout = _layout(item, members, edition)
    if layout is not None:  # the same result as the loop below, from the precomputed offsets
        size = len(payload)
        pos = 0
        for end, slots in layout:
            if end > size:
                return values, pos, (not item.fixed and pos == size and pos > 0)
            for name, start, stop, quantity in slots:
                values[name] = quantity(payload[start:stop])
            pos = end
        return values, pos, True
    pos = 0
    for di in members:
        member = lookup(di, edition)
        if member is None:
            return values, pos, False
        if member.members:
            sub, used, ok = _block(member, payload[pos:], edition, tariffs, nested=True)
            values.update(sub)
            pos += used
            if not ok:
                return values, pos, False
            continue
        width = sum(f.fmt.width for f in member.fields)
        if pos + width > len(payload):
            # An open block may legitimately end early (fewer tariffs than listed) at a member edge.
            return values, pos, (not item.fixed and pos == len(payload) and pos > 0)
        values.update(decode_fields(member.fields, payload[pos : pos + width]).values)
        pos += width
    return values, pos, True
