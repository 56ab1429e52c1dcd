"""DL/T 645-2007 and -1997, sans-I/O: frames, stream framing, the DI table, values, requests, replies.

Typical use on the master side::

    wire = read_request("000102030425", 0x00010000)
    ...send wire, receive bytes...
    for event in framer.feed(received):
        if isinstance(event, Frame):
            reply = decode(event)        # reply.values["forward_active_energy"].value
"""

from protocols.dlt645.address import BROADCAST, WILDCARD, abbreviated, from_wire, normalize, to_wire
from protocols.dlt645.answers import Request, error_reply, normal_reply, parse_request, read_reply
from protocols.dlt645.control import (
    Action,
    ControlPayload,
    PayloadBuilder,
    PlaintextBuilder,
    RelayStatus,
    control_request,
    parse_control_payload,
)
from protocols.dlt645.errors import (
    AddressError,
    BadChecksum,
    BadEnd,
    BadStart,
    DecodeError,
    Dlt645Error,
    EncodeError,
    FrameError,
    Garbage,
    TrailingBytes,
    TruncatedFrame,
)
from protocols.dlt645.formats import INVALID
from protocols.dlt645.frame import Frame, build, parse
from protocols.dlt645.framer import Accept, Framer
from protocols.dlt645.identifiers import find, lookup
from protocols.dlt645.items import DataItem, Field, Quantity
from protocols.dlt645.replies import (
    FUNCTION_NAMES,
    Error1997,
    Error2007,
    Reply,
    decode,
    decode_data,
    edition_of,
    error_names,
)
from protocols.dlt645.requests import (
    BAUD_CODES,
    Auth,
    broadcast_time_request,
    change_baud_request,
    change_password_request,
    clear_demand_request,
    clear_events_request,
    clear_meter_request,
    freeze_request,
    output_request,
    read_address_request,
    read_follow_up,
    read_request,
    reread_request,
    write_address_request,
    write_request,
)
from protocols.dlt645.sequence import ReadSequence

__all__ = [
    "BAUD_CODES",
    "BROADCAST",
    "FUNCTION_NAMES",
    "INVALID",
    "WILDCARD",
    "Accept",
    "Action",
    "AddressError",
    "Auth",
    "BadChecksum",
    "BadEnd",
    "BadStart",
    "ControlPayload",
    "DataItem",
    "DecodeError",
    "Dlt645Error",
    "EncodeError",
    "Error1997",
    "Error2007",
    "Field",
    "Frame",
    "FrameError",
    "Framer",
    "Garbage",
    "PayloadBuilder",
    "PlaintextBuilder",
    "Quantity",
    "ReadSequence",
    "RelayStatus",
    "Reply",
    "Request",
    "TrailingBytes",
    "TruncatedFrame",
    "abbreviated",
    "broadcast_time_request",
    "build",
    "change_baud_request",
    "change_password_request",
    "clear_demand_request",
    "clear_events_request",
    "clear_meter_request",
    "control_request",
    "decode",
    "decode_data",
    "edition_of",
    "error_names",
    "error_reply",
    "find",
    "freeze_request",
    "from_wire",
    "lookup",
    "normal_reply",
    "normalize",
    "output_request",
    "parse",
    "parse_control_payload",
    "parse_request",
    "read_address_request",
    "read_follow_up",
    "read_reply",
    "read_request",
    "reread_request",
    "to_wire",
    "write_address_request",
    "write_request",
]
