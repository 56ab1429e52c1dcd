"""The control tables in the journal: commands and their audit trail.

Plain synchronous functions on a `sqlite3.Connection`, run through `Journal.write`
(writer thread, group transaction, own savepoint) or `Journal.read`. Each state
change updates the command's row *and* appends its audit event in the same
transaction, so the trail can never miss or invent a change. A state change is a
compare-and-set on the previous state: a late writer (a lane finishing an attempt
on a command that was just superseded) changes nothing and learns so.

`control_events` is a stream like the readings: sinks follow it with a cursor in
the journal's `cursors` table (stream "control", names like "sink:<name>").
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from gateway import journal_store
from gateway.control.model import GROUP, TERMINAL, Action, Command, Conflict, State

STREAM = "control"
SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, meter TEXT NOT NULL, action TEXT NOT NULL,
    state TEXT NOT NULL, created REAL NOT NULL, data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_meter ON commands (meter, created);
CREATE INDEX IF NOT EXISTS commands_state ON commands (state);
CREATE TABLE IF NOT EXISTS control_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, command TEXT NOT NULL, time REAL NOT NULL, data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS control_events_command ON control_events (command);
"""
OPEN_STATES = tuple(sorted(str(s) for s in State if s not in TERMINAL))
_OPEN = ", ".join("?" * len(OPEN_STATES))
WAITING = "close allowed, waiting for the customer"


@dataclass
class Submitted:
    """What `submit` did: the command (the existing one for a repeated request_id)."""

    command: Command
    existing: bool = False
    superseded: list[Command] = field(default_factory=list)


def create(conn: sqlite3.Connection) -> None:
    """Create the tables (statement by statement: executescript would commit the writer's transaction)."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


def _dump(command: Command) -> str:
    return json.dumps(command.public(), separators=(",", ":"))


def _event(conn: sqlite3.Connection, command: Command) -> None:
    conn.execute("INSERT INTO control_events (command, time, data) VALUES (?, ?, ?)",
                 (command.id, command.updated, _dump(command)))


def _load(text: str) -> Command:
    return Command.from_public(json.loads(text))


def by_request_id(conn: sqlite3.Connection, request_id: str) -> Command | None:
    row = conn.execute("SELECT data FROM commands WHERE request_id = ?", (request_id,)).fetchone()
    return _load(row[0]) if row else None


def submit(conn: sqlite3.Connection, command: Command) -> Submitted:
    """Insert a new command (and its first audit event) unless its request_id exists.

    Same request_id for the same meter and action: the existing command, unchanged.
    Otherwise Conflict. A pending command supersedes every older open command of the
    same group for that meter, in this same transaction.
    """
    old = by_request_id(conn, command.request_id)
    if old is not None:
        if old.meter == command.meter and old.action is command.action:
            return Submitted(old, existing=True)
        raise Conflict(f"request_id {command.request_id!r} is already used by command {old.id} "
                       f"({old.action} for meter {old.meter})")
    conn.execute("INSERT INTO commands (id, request_id, meter, action, state, created, data) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (command.id, command.request_id, command.meter, str(command.action), str(command.state),
                  command.created, _dump(command)))
    _event(conn, command)
    result = Submitted(command)
    if command.state is State.PENDING:
        actions = [str(a) for a in Action if GROUP[a] == command.action.group]
        rows = conn.execute(
            f"SELECT data FROM commands WHERE meter = ? AND id != ? AND state IN ({_OPEN}) "  # noqa: S608
            f"AND action IN ({', '.join('?' * len(actions))}) ORDER BY created, rowid",
            (command.meter, command.id, *OPEN_STATES, *actions)).fetchall()
        for (text,) in rows:
            older = _load(text)
            expected = older.state
            older.state, older.updated = State.SUPERSEDED, command.created
            older.fail_reason = f"superseded by {command.id}"
            older.detail = f"a later {command.action} ({command.id}) replaced it"
            transition(conn, older, expected)
            result.superseded.append(older)
    return result


def transition(conn: sqlite3.Connection, command: Command, expected: State) -> bool:
    """Store `command` if its stored state is still `expected`; append the audit event. False: it moved."""
    cur = conn.execute("UPDATE commands SET state = ?, data = ? WHERE id = ? AND state = ?",
                       (str(command.state), _dump(command), command.id, str(expected)))
    if cur.rowcount != 1:
        return False
    _event(conn, command)
    return True


# ---- reads ----

def get(conn: sqlite3.Connection, command_id: str) -> Command | None:
    row = conn.execute("SELECT data FROM commands WHERE id = ?", (command_id,)).fetchone()
    return _load(row[0]) if row else None


def list_commands(conn: sqlite3.Connection, meter: str | None, limit: int) -> list[Command]:
    """Newest first."""
    if meter is None:
        rows = conn.execute("SELECT data FROM commands ORDER BY created DESC, rowid DESC LIMIT ?", (limit,))
    else:
        rows = conn.execute("SELECT data FROM commands WHERE meter = ? ORDER BY created DESC, rowid DESC LIMIT ?",
                            (meter, limit))
    return [_load(r[0]) for r in rows.fetchall()]


def open_commands(conn: sqlite3.Connection) -> list[Command]:
    """Every command that is not terminal, in submission order (what a restart resumes)."""
    rows = conn.execute(f"SELECT data FROM commands WHERE state IN ({_OPEN}) ORDER BY created, rowid",  # noqa: S608
                        OPEN_STATES).fetchall()
    return [_load(r[0]) for r in rows]


def waiting_for_customer(conn: sqlite3.Connection) -> list[Command]:
    """Verified allow_close commands still waiting for the button, with no later relay command."""
    rows = conn.execute("SELECT data FROM commands WHERE action = 'allow_close' AND state = 'verified' "
                        "AND json_extract(data, '$.detail') = ?", (WAITING,)).fetchall()
    out = []
    for (text,) in rows:
        command = _load(text)
        later = conn.execute("SELECT 1 FROM commands WHERE meter = ? AND created > ? AND action IN "
                             "('trip', 'allow_close', 'close') AND state != 'failed' LIMIT 1",
                             (command.meter, command.created)).fetchone()
        if later is None:
            out.append(command)
    return out


# ---- the event stream for sinks ----

def read_events(conn: sqlite3.Connection, cursor: str, limit: int) -> list[tuple[int, dict[str, Any]]]:
    """Audit events after this cursor's position, oldest first, as (seq, command snapshot)."""
    start = journal_store.position(conn, STREAM, cursor)
    rows = conn.execute("SELECT seq, data FROM control_events WHERE seq > ? ORDER BY seq LIMIT ?",
                        (start, limit)).fetchall()
    return [(int(seq), json.loads(data)) for seq, data in rows]


def advance_events(conn: sqlite3.Connection, cursor: str, upto: int) -> None:
    """Durably mark events up to `upto` as forwarded (never moves back). Run through Journal.write."""
    journal_store.advance(conn, STREAM, cursor, upto)


def events_backlog(conn: sqlite3.Connection, cursor: str) -> int:
    start = journal_store.position(conn, STREAM, cursor)
    return int(conn.execute("SELECT count(*) FROM control_events WHERE seq > ?", (start,)).fetchone()[0])


def events_of(conn: sqlite3.Connection, command_id: str) -> list[dict[str, Any]]:
    """A command's audit trail, oldest first."""
    rows = conn.execute("SELECT data FROM control_events WHERE command = ? ORDER BY seq", (command_id,))
    return [json.loads(r[0]) for r in rows.fetchall()]


def prune(conn: sqlite3.Connection, before: float) -> tuple[int, int]:
    """Forget finished commands last changed before `before`, and their audit trails (whole).

    Open commands are never forgotten, whatever their age. A request_id is remembered as long
    as its command is: keep `before` well past `max_valid_for`, so a repeated request can only
    come back after its command could no longer have been sent anyway.
    """
    commands = conn.execute(
        f"DELETE FROM commands WHERE state NOT IN ({_OPEN}) AND "  # noqa: S608
        "json_extract(data, '$.updated') < ?", (*OPEN_STATES, before)).rowcount
    events = conn.execute("DELETE FROM control_events WHERE command NOT IN (SELECT id FROM commands)").rowcount
    return commands, events
