"""The third journal stream a sink forwards: control commands' audit events (every state change).

The events live in the control tables of the journal (gateway/control/store.py); a sink
follows them with its own cursor (`sink:<name>` in stream "control") like readings, so a
command's fate reaches InfluxDB and MQTT at least once, even across restarts and outages.
A journal that has no control tables yet (control never started) is an empty stream, not
an error; a journal without module SQL (`read`/`write`) has no control stream at all.

InfluxDB schema, fixed forever: measurement `control`; tags `action`, `meter`, `state`,
`station` (bounded: the actions, the states, the archive's meters, one station); fields
`command_id`, `request_id`, `fail_reason`, `detail` (strings, "" when empty), `attempts`
(integer), `dry_run` (boolean); timestamp = the change's time in whole seconds. Two changes
of one meter to the same action and state within one second are one point (the later wins);
the journal and MQTT keep both.

MQTT: the event's JSON (the command as the API shows it, plus `time` and `seq`) on
`<prefix>/<station>/commands/<id>`, retained, so the topic shows the command's latest state.
"""

from __future__ import annotations

import logging
import math
import re
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar, runtime_checkable

from gateway.control import store
from gateway.control.model import Action, State
from gateway.sinks.lineproto import escape_key, field_value, quote_string, tag_set

log = logging.getLogger(__name__)
T = TypeVar("T")
Event = dict[str, Any]
MEASUREMENT = "control"
UNKNOWN = "unknown"  # a tag value outside the known actions/states (a newer meterd wrote it)
# Never forwarded, whatever a future Command grows: secrets stay on the box.
SECRET = re.compile(r"pass(word|wd)?$|secret|token|operator_code", re.IGNORECASE)


@runtime_checkable
class ModuleJournal(Protocol):
    """A journal that runs other modules' SQL (gateway.journal.Journal)."""

    async def read(self, fn: Callable[..., T], *args: Any) -> T: ...

    async def write(self, fn: Callable[..., T], *args: Any) -> T: ...


def _no_table(exc: sqlite3.OperationalError) -> bool:
    return "no such table" in str(exc)


def read_events(conn: sqlite3.Connection, cursor: str, limit: int) -> list[tuple[int, Event]]:
    """store.read_events; nothing when the control tables do not exist yet."""
    try:
        return store.read_events(conn, cursor, limit)
    except sqlite3.OperationalError as exc:
        if _no_table(exc):
            return []
        raise


def events_backlog(conn: sqlite3.Connection, cursor: str) -> int:
    try:
        return store.events_backlog(conn, cursor)
    except sqlite3.OperationalError as exc:
        if _no_table(exc):
            return 0
        raise


class ControlEvents:
    """The control stream of one journal, as a sink reads it."""

    def __init__(self, journal: ModuleJournal) -> None:
        self.journal = journal

    async def read(self, cursor: str, limit: int) -> list[tuple[int, Event]]:
        return await self.journal.read(read_events, cursor, limit)

    async def advance(self, cursor: str, upto: int) -> None:
        await self.journal.write(store.advance_events, cursor, upto)

    async def backlog(self, cursor: str) -> int:
        return await self.journal.read(events_backlog, cursor)


def events_of(journal: object) -> ControlEvents | None:
    return ControlEvents(journal) if isinstance(journal, ModuleJournal) else None


class BadEvent(ValueError):
    """An audit event a sink cannot encode (missing or mistyped keys)."""


def public_event(seq: int, event: Event) -> Event:
    """The event as published: without secret-looking keys, with `seq` and `time` always present."""
    data = {k: v for k, v in event.items() if not SECRET.search(str(k))}
    data.setdefault("seq", seq)
    data.setdefault("time", data.get("updated"))
    return data


def event_time(event: Event) -> float:
    value = event.get("time")
    if value is None:
        value = event.get("updated")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise BadEvent(f"event {event.get('seq')} of command {event.get('id')!r} has no valid time: {value!r}")
    return float(value)


def _bounded(value: object, known: Iterable[str]) -> str:
    text = str(value)
    return text if text in set(known) else UNKNOWN


def _text(event: Event, key: str) -> str:
    value = event.get(key)
    return "" if value is None else str(value)


def control_line(event: Event, station: str) -> str:
    """One audit event -> one `control` line; BadEvent when it lacks what the schema needs."""
    meter, command_id = event.get("meter"), event.get("id")
    if not isinstance(meter, str) or not meter or not isinstance(command_id, str) or not command_id:
        raise BadEvent(f"event {event.get('seq')} has no meter or command id")
    attempts = event.get("attempts", 0)
    if isinstance(attempts, bool) or not isinstance(attempts, int):
        raise BadEvent(f"event {event.get('seq')} of command {command_id}: attempts is {attempts!r}")
    tags = tag_set([("meter", meter), ("station", station),
                    ("action", _bounded(event.get("action"), (str(a) for a in Action))),
                    ("state", _bounded(event.get("state"), (str(s) for s in State)))])
    fields = [("command_id", quote_string(command_id)), ("request_id", quote_string(_text(event, "request_id"))),
              ("fail_reason", quote_string(_text(event, "fail_reason"))),
              ("detail", quote_string(_text(event, "detail"))), ("attempts", field_value(attempts)),
              ("dry_run", field_value(bool(event.get("dry_run", False))))]
    body = ",".join(f"{escape_key(k)}={v}" for k, v in fields)
    return f"{MEASUREMENT}{tags} {body} {math.floor(event_time(event))}"


def encode_each(events: list[Event], encode: Callable[[Event], T], sink: str) -> list[T]:
    """Encode every event; one that cannot be encoded is logged and left out (it stays in the journal)."""
    units: list[T] = []
    for event in events:
        try:
            units.append(encode(event))
        except (BadEvent, TypeError, ValueError) as exc:
            log.warning("sink %s: control event %s not forwarded: %s", sink, event.get("seq"), exc)
    return units
