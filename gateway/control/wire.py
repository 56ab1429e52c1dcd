"""The two exchanges control needs on a meter's bus: read status word 3, send one 1C.

Both go at Priority.CONTROL (ahead of polling). The 1C is sent with the bus's own
retries switched off: a 1C whose answer was lost may have been carried out, so a
resend is the engine's decision, made after reading status word 3, never blind.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from gateway.archive import MeterConfig
from gateway.bus import BadFrame, Bus, Priority, Timing
from protocols.dlt645 import (
    Action,
    DecodeError,
    PayloadBuilder,
    ReadSequence,
    RelayStatus,
    Reply,
    control_request,
    decode,
    error_names,
)
from protocols.dlt645.control import FUNCTION, STATUS_WORD_3

STATUS_NAME = "status_word_3"


async def read_status(bus: Bus, meter: MeterConfig, timing: Timing) -> tuple[int, RelayStatus]:
    """Status word 3 of `meter` (the word and its relay reading); BusError subclasses when it cannot."""
    sequence = ReadSequence(meter.address, STATUS_WORD_3, meter.edition, tariffs=meter.tariffs)
    request: bytes | None = sequence.request
    while request is not None:
        frame = await bus.transact(request, meter.address, priority=Priority.CONTROL, timing=timing)
        if frame is None:
            raise BadFrame(f"no frame from {meter.address}")
        try:
            request = sequence.feed(decode(frame, meter.edition, tariffs=meter.tariffs))
        except DecodeError as exc:
            raise BadFrame(f"undecodable status word 3 from {meter.address}: {exc}") from exc
    reply = sequence.reply
    assert reply is not None
    if reply.error is not None or STATUS_NAME not in reply.values:
        why = ",".join(error_names(reply.error)) if reply.error is not None else "no value"
        raise BadFrame(f"{meter.address} did not give status word 3 ({why})")
    word = int(reply.values[STATUS_NAME].value)
    return word, RelayStatus.from_word(word)


async def send_control(bus: Bus, meter: MeterConfig, timing: Timing, action: Action, *, deadline: dt.datetime,
                       builder: PayloadBuilder) -> Reply:
    """One 1C frame, no bus-level retry; the decoded 9C/DC answer (BusError subclasses otherwise)."""
    request = control_request(meter.address, action, deadline, builder=builder)
    frame = await bus.transact(request, meter.address, priority=Priority.CONTROL,
                               timing=dataclasses.replace(timing, retries=0))
    if frame is None:
        raise BadFrame(f"no frame from {meter.address}")
    try:
        reply = decode(frame, meter.edition, tariffs=meter.tariffs)
    except DecodeError as exc:
        raise BadFrame(f"undecodable answer to the 1C from {meter.address}: {exc}") from exc
    if reply.function != FUNCTION:
        raise BadFrame(f"{meter.address} answered function {reply.function:02X} to a 1C")
    return reply
