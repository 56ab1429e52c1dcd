"""The two exchanges control needs on a meter's bus (read status word 3, send one 1C),
and what status word 3 says about a command.

Both go at Priority.CONTROL (ahead of polling). The 1C is sent with the bus's own
retries switched off: a 1C whose answer was lost may have been carried out, so a
resend is the engine's decision, made after reading status word 3, never blind.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from gateway.archive import MeterConfig
from gateway.bus import BadFrame, Bus, Priority, Timing
from gateway.control.model import Action as UserAction
from gateway.control.store import WAITING
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
BECAUSE = {"link_down": "the link was down", "no_reply": "the meter did not answer",
           "bad_frame": "the meter's answers were garbled", "quiet_hours": "quiet hours",
           "rate_limited": "the station's trip rate limit", "never_reached": "it was never reached"}


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


def received(action: UserAction, status: RelayStatus) -> bool:
    """Does status word 3 show that an earlier 1C of `action` reached the meter?"""
    if action is UserAction.TRIP:
        return status.relay_open or status.trip_commanded
    return status.satisfies(action.wire)


def verified_detail(action: UserAction, status: RelayStatus) -> str:
    if action is UserAction.ALLOW_CLOSE:
        return WAITING if status.relay_open else "closed"
    if action is UserAction.TRIP:
        return "relay open"
    if action is UserAction.CLOSE:
        return "relay closed"
    return f"status word 3 shows {action}"


def describe(status: RelayStatus | None) -> str:
    if status is None:
        return "status word 3 could not be read"
    shown = [name for name, on in status._asdict().items() if on]
    return "status word 3 shows " + (", ".join(shown) if shown else "relay closed, no command, no alarm")
