"""`meterd decode`: captured frames in, one JSON object per frame out.

Field engineers paste what a sniffer or DTU log shows: bytes separated by
spaces or not, with FE preambles, sometimes several frames stuck together.
A bad frame is explained on stderr and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import string
import sys
from typing import Any

from protocols.dlt645 import (
    FUNCTION_NAMES,
    Accept,
    DecodeError,
    Frame,
    FrameError,
    Framer,
    Quantity,
    TrailingBytes,
    decode,
    edition_of,
    error_names,
    lookup,
    parse,
    parse_control_payload,
    parse_request,
)

_HEX = set(string.hexdigits)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("decode", help="decode captured DL/T 645 frames (hex) to JSON",
                       description="Decode DL/T 645 frames given as hex. Each argument is one capture; "
                       "unquoted space-separated bytes are joined. '-' reads one capture per line from stdin.")
    p.add_argument("hex", nargs="+", metavar="HEX", help="frame bytes in hex, or - for stdin")
    p.add_argument("--edition", type=int, choices=(1997, 2007), help="force the edition (default: by function code)")
    p.add_argument("--tariffs", type=int, default=4, help="tariff members in nested freeze blocks (default 4)")
    p.set_defaults(handler=run)


def captures(args: list[str]) -> list[str]:
    """Arguments -> captures: `meterd decode 68 25 04 ...` is one capture, not 20."""
    if args == ["-"]:
        return [line for line in sys.stdin.read().splitlines() if line.strip()]
    if len(args) > 1 and all(len(a) == 2 for a in args):
        return [" ".join(args)]
    return args


def to_bytes(text: str) -> bytes:
    cleaned = text.replace(" ", "").replace(":", "").replace("\t", "")
    if not cleaned:
        raise ValueError("empty capture")
    bad = sorted({c for c in cleaned if c not in _HEX})
    if bad:
        raise ValueError(f"not hex: unexpected characters {''.join(bad)!r}")
    if len(cleaned) % 2:
        raise ValueError(f"odd number of hex digits ({len(cleaned)})")
    return bytes.fromhex(cleaned)


def frames_of(raw: bytes) -> list[Frame | FrameError]:
    try:
        return [parse(raw)]
    except TrailingBytes:
        pass  # several frames stuck together: let the stream framer split them
    except FrameError as exc:
        return [exc]
    framer = Framer(Accept.ALL)
    return framer.feed(raw) + framer.flush()


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    return value


def _quantity(q: Quantity) -> dict[str, Any]:
    out: dict[str, Any] = {"value": _json_value(q.value), "unit": q.unit}
    if q.flags:
        out["flags"] = list(q.flags)
    return out


def describe(frame: Frame, edition: int | None, tariffs: int) -> dict[str, Any]:
    ed = edition or edition_of(frame)
    out: dict[str, Any] = {
        "address": frame.address,
        "control": f"{frame.control:02X}",
        "function": f"{frame.function:02X}",
        "function_name": FUNCTION_NAMES[ed].get(frame.function, "unknown"),
        "direction": "reply" if frame.is_reply else "request",
        "edition": ed,
    }
    if frame.is_reply:
        reply = decode(frame, ed, tariffs=tariffs)
        out.update(abnormal=frame.is_abnormal, more=frame.has_more)
        if reply.di is not None:
            out["di"] = f"{reply.di:0{4 if reply.edition == 1997 else 8}X}"
            out["item"] = reply.item.name if reply.item else None
        if reply.seq is not None:
            out["seq"] = reply.seq
        out["values"] = {name: _quantity(q) for name, q in reply.values.items()}
        if reply.error is not None:
            out["error"] = {"code": int(reply.error), "bits": error_names(reply.error)}
        if reply.more or reply.seq is not None:
            out["payload"] = reply.payload.hex().upper()
        if not reply.complete:
            out["length_mismatch"] = True
        return out
    request = parse_request(frame, edition)
    if request.di is not None:
        item = lookup(request.di, request.edition)
        out["edition"] = request.edition
        out["di"] = f"{request.di:0{4 if request.edition == 1997 else 8}X}"
        out["item"] = item.name if item else None
    if request.seq is not None:
        out["seq"] = request.seq
    if frame.function == 0x1C and ed == 2007:
        payload = parse_control_payload(frame.data)
        out["control_action"] = getattr(payload.action, "name", payload.action)
        out["password_level"] = payload.auth.level  # the password itself is never printed
        out["operator"] = payload.auth.operator
        out["deadline"] = payload.deadline.isoformat() if payload.deadline else None
    elif request.body:
        out["body"] = request.body.hex().upper()
    return out


def run(args: argparse.Namespace) -> int:
    status = 0
    for capture in captures(args.hex):
        try:
            raw = to_bytes(capture)
        except ValueError as exc:
            print(f"meterd decode: {capture!r}: {exc}", file=sys.stderr)
            status = 1
            continue
        for event in frames_of(raw):
            if isinstance(event, FrameError):
                print(f"meterd decode: {raw.hex(' ').upper()}: {event.reason}: {event}", file=sys.stderr)
                status = 1
                continue
            try:
                print(json.dumps(describe(event, args.edition, args.tariffs), ensure_ascii=False))
            except DecodeError as exc:
                print(f"meterd decode: {raw.hex(' ').upper()}: cannot decode: {exc}", file=sys.stderr)
                status = 1
    return status
