"""The journal's SQLite side: schema, Reading <-> row conversion and the queries.

Plain synchronous functions on a `sqlite3.Connection`. They run in the
journal's writer or reader thread, or directly in one-shot commands
(`meterd readings`), never on the event loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
from itertools import chain
from pathlib import Path
from typing import Any

import pydantic

from gateway.model import Quality, Reading, RoundStats

SCHEMA_VERSION = 1
READINGS, ROUNDS = "readings", "rounds"  # the two streams a sink cursor can follow
WAL_LIMIT = 4 * 1024 * 1024  # the WAL file is truncated back to this after a checkpoint

# `value` has no declared type on purpose: no affinity, so SQLite keeps what it is given
# (REAL, INTEGER, TEXT, NULL); `vtype` says which Python type to rebuild.
# AUTOINCREMENT: ids are never reused, even after retention empties the table, so a
# sink cursor can never skip rows written after a purge.
SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    meter TEXT NOT NULL, quantity TEXT NOT NULL, value, vtype TEXT NOT NULL, unit TEXT NOT NULL,
    time REAL NOT NULL, collected REAL NOT NULL, station TEXT NOT NULL, link TEXT NOT NULL,
    plan TEXT NOT NULL, frozen INTEGER NOT NULL, quality TEXT NOT NULL,
    UNIQUE (meter, quantity, time)
);
CREATE INDEX IF NOT EXISTS readings_collected ON readings (collected);
CREATE TABLE IF NOT EXISTS rounds (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, round_id TEXT NOT NULL UNIQUE,
    plan TEXT NOT NULL, started REAL NOT NULL, stats TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rounds_started ON rounds (started);
CREATE TABLE IF NOT EXISTS cursors (
    stream TEXT NOT NULL, name TEXT NOT NULL, position INTEGER NOT NULL, PRIMARY KEY (stream, name)
) WITHOUT ROWID;
"""
COLUMNS = "meter, quantity, value, vtype, unit, time, collected, station, link, plan, frozen, quality"
# SQL below is assembled only from these constants and fixed condition lists, never from input.
INSERT_READING = f"INSERT OR IGNORE INTO readings ({COLUMNS}) VALUES ({', '.join('?' * 12)})"  # noqa: S608
INSERT_CHUNK = 64  # rows per multi-row INSERT (768 parameters; SQLite allows 32,766)
READ_BATCH = f"SELECT id, {COLUMNS} FROM readings WHERE id > ? ORDER BY id LIMIT ?"  # noqa: S608
BACKLOG = {READINGS: "SELECT count(*) FROM readings WHERE id > ?", ROUNDS: "SELECT count(*) FROM rounds WHERE seq > ?"}
RECENT_ROUNDS = "SELECT stats FROM rounds WHERE plan = coalesce(?, plan) ORDER BY started DESC, seq DESC LIMIT ?"
Row = tuple[Any, ...]
INT64 = 2**63


class JournalConfig(pydantic.BaseModel):
    """`[journal]` in the config: retention and the writer's group commit."""

    model_config = pydantic.ConfigDict(extra="forbid")

    retention_days: float = pydantic.Field(default=30, gt=0)
    max_bytes: int = pydantic.Field(default=1_000_000_000, gt=0)
    batch_max: int = pydantic.Field(default=2000, gt=0)  # readings per transaction, at most (one append is never split)
    commit_interval: float = pydantic.Field(default=0.05, ge=0)  # s: under load, at most one commit per interval


class JournalError(Exception):
    """The journal cannot do what was asked: corrupt file, disk full, no permission, closed."""


class BadReading(JournalError, ValueError):
    """A reading the journal cannot store as it is (a value of an unsupported type)."""


def explain(exc: BaseException, path: Path) -> JournalError:
    """A storage exception -> a JournalError that says what is wrong and with which file."""
    if isinstance(exc, JournalError):
        return exc
    text = str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text):
        why = f"the journal {path} is corrupt ({text}); move it aside and meterd starts a new one"
    elif "full" in text:
        why = f"the journal {path} cannot grow: {text} (free disk space or lower [journal] max_bytes)"
    elif "readonly" in text or "unable to open" in text or isinstance(exc, PermissionError):
        why = f"the journal {path} is not writable: {text} (check the state directory and its owner)"
    else:
        why = f"journal {path}: {type(exc).__name__}: {text}"
    return JournalError(why)


def connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """Autocommit connection (transactions are explicit); read-only ones never create the file."""
    if readonly:
        uri = path.resolve().as_uri() + "?mode=ro"
        return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=5)
    return sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=5)


def prepare(conn: sqlite3.Connection, path: Path) -> None:
    """Set the writer's pragmas and create the schema: WAL, synchronous=FULL (see journal.py)."""
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect only on a new, empty file
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise JournalError(f"the journal {path} cannot use WAL mode (got {mode!r}); is it on a network filesystem?")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise JournalError(f"the journal {path} has schema {version}, written by a newer meterd (this one reads 1)")
    conn.execute("BEGIN IMMEDIATE")
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    conn.execute("COMMIT")


def insert_rows(conn: sqlite3.Connection, rows: list[Row]) -> None:
    """INSERT OR IGNORE the rows with multi-row statements of 64, 32, ... 1 rows.

    Why not executemany: CPython's sqlite3 releases the GIL around every sqlite3_step, so a
    statement per row costs a GIL hand-off per row while the event loop thread is busy (measured
    3x the writer's CPU). Power-of-two sizes keep the prepared statements to seven.
    """
    i, n = 0, len(rows)
    size = INSERT_CHUNK
    while i < n:
        while n - i < size:
            size //= 2
        conn.execute(_insert_sql(size), list(chain.from_iterable(rows[i:i + size])))
        i += size


_INSERT_SQL: dict[int, str] = {}


def _insert_sql(rows: int) -> str:
    sql = _INSERT_SQL.get(rows)
    if sql is None:
        one = f"({', '.join('?' * 12)})"
        sql = _INSERT_SQL[rows] = f"INSERT OR IGNORE INTO readings ({COLUMNS}) VALUES {', '.join([one] * rows)}"  # noqa: S608
    return sql


def _int_column(v: int) -> tuple[Any, str]:
    return (v if -INT64 <= v < INT64 else str(v)), "int"  # beyond SQLite's 64-bit integers: kept as digits


# value type -> (column value, vtype); exact types only: a subclass (an IntEnum) takes the slow path
_TO_COLUMN: dict[type, Any] = {
    float: lambda v: (v, "float"), str: lambda v: (v, "str"), int: _int_column,
    bool: lambda v: (int(v), "bool"), type(None): lambda v: (None, "none"),
}


def to_row(r: Reading) -> Row:
    """Reading -> the 12 columns; raises BadReading for a value SQLite cannot keep exactly."""
    v: Any = r.value
    convert = _TO_COLUMN.get(type(v))
    if convert is not None:
        v, vtype = convert(v)
    elif isinstance(v, bool):
        vtype, v = "bool", int(v)
    elif isinstance(v, int):
        v, vtype = _int_column(v)
    elif isinstance(v, float):
        vtype = "float"
    elif isinstance(v, str):
        vtype = "str"
    else:
        raise BadReading(f"reading {r.meter}/{r.quantity}: value {v!r} has type {type(v).__name__}, "
                         "not float/int/str/bool/None")
    quality = r.quality
    return (r.meter, r.quantity, v, vtype, r.unit, r.time, r.collected, r.station, r.link, r.plan,
            int(r.frozen), quality.value if isinstance(quality, Quality) else str(quality))


# vtype -> the value's Python type again (SQLite stores NaN as NULL)
_FROM_COLUMN: dict[str, Any] = {
    "float": lambda raw: math.nan if raw is None else float(raw), "int": int, "bool": bool, "str": str,
}
_QUALITIES: dict[str, Quality] = {q.value: q for q in Quality}


def from_row(row: Row) -> Reading:
    """The 12 columns (in COLUMNS order) -> Reading with the value's original Python type.

    An unknown vtype reads as None and an unknown quality as invalid (a newer meterd's file)."""
    meter, quantity, raw, vtype, unit, time, collected, station, link, plan, frozen, quality = row
    convert = _FROM_COLUMN.get(vtype)
    return Reading(meter, quantity, None if convert is None else convert(raw), unit, time, collected, station, link,
                   plan, bool(frozen), _QUALITIES.get(quality, Quality.INVALID))


def stats_json(stats: RoundStats) -> str:
    return json.dumps(dataclasses.asdict(stats), sort_keys=True)


def stats_from_json(text: str) -> RoundStats:
    data = json.loads(text)
    names = {f.name for f in dataclasses.fields(RoundStats)}
    return RoundStats(**{k: v for k, v in data.items() if k in names})


# ---- writes (writer thread, inside its transaction) ----

def upsert_round(conn: sqlite3.Connection, stats: RoundStats) -> None:
    """REPLACE gives the round a new, higher seq, so cursors see every update of a round."""
    conn.execute("INSERT OR REPLACE INTO rounds (round_id, plan, started, stats) VALUES (?, ?, ?, ?)",
                 (stats.round_id, stats.plan, stats.started, stats_json(stats)))


def ensure_cursor(conn: sqlite3.Connection, stream: str, name: str) -> None:
    conn.execute("INSERT OR IGNORE INTO cursors (stream, name, position) VALUES (?, ?, 0)", (stream, name))


def advance(conn: sqlite3.Connection, stream: str, name: str, upto: int) -> None:
    """Cursors only move forward: a late or repeated advance never re-sends or skips."""
    conn.execute("INSERT INTO cursors (stream, name, position) VALUES (?, ?, ?) ON CONFLICT (stream, name) "
                 "DO UPDATE SET position = max(position, excluded.position)", (stream, name, upto))


# ---- reads (reader thread or a read-only connection) ----

def position(conn: sqlite3.Connection, stream: str, name: str) -> int:
    row = conn.execute("SELECT position FROM cursors WHERE stream = ? AND name = ?", (stream, name)).fetchone()
    return int(row[0]) if row else 0


def read_batch(conn: sqlite3.Connection, name: str, limit: int) -> list[tuple[int, Reading]]:
    rows = conn.execute(READ_BATCH, (position(conn, READINGS, name), limit)).fetchall()
    return [(row[0], from_row(row[1:])) for row in rows]


def backlog(conn: sqlite3.Connection, stream: str, name: str) -> int:
    row = conn.execute(BACKLOG[stream], (position(conn, stream, name),)).fetchone()
    return int(row[0])


def read_rounds(conn: sqlite3.Connection, name: str, limit: int) -> list[tuple[int, RoundStats]]:
    rows = conn.execute("SELECT seq, stats FROM rounds WHERE seq > ? ORDER BY seq LIMIT ?",
                        (position(conn, ROUNDS, name), limit)).fetchall()
    return [(seq, stats_from_json(text)) for seq, text in rows]


def recent_rounds(conn: sqlite3.Connection, plan: str | None, limit: int) -> list[RoundStats]:
    rows = conn.execute(RECENT_ROUNDS, (plan, limit)).fetchall()
    return [stats_from_json(text) for (text,) in rows]


def query(conn: sqlite3.Connection, *, meter: str | None = None, since: float | None = None,
          until: float | None = None, quantity: str | None = None, limit: int = 1000) -> list[Reading]:
    """The newest `limit` readings matching, returned oldest first (newest last)."""
    conds: list[str] = []
    args: list[Any] = []
    for cond, arg in (("meter = ?", meter), ("quantity = ?", quantity), ("time >= ?", since), ("time <= ?", until)):
        if arg is not None:
            conds.append(cond)
            args.append(arg)
    where = f"WHERE {' AND '.join(conds)}" if conds else ""
    sql = f"SELECT {COLUMNS} FROM readings {where} ORDER BY time DESC, id DESC LIMIT ?"  # noqa: S608
    rows = conn.execute(sql,
                        [*args, limit]).fetchall()
    return [from_row(row) for row in reversed(rows)]


def meters(conn: sqlite3.Connection) -> list[str]:
    """Distinct meters by skipping through the unique index: O(meters * log rows), not a scan."""
    rows = conn.execute(
        "WITH RECURSIVE m(x) AS (SELECT min(meter) FROM readings UNION ALL "
        "SELECT (SELECT min(meter) FROM readings WHERE meter > x) FROM m WHERE x IS NOT NULL) "
        "SELECT x FROM m WHERE x IS NOT NULL").fetchall()
    return [x for (x,) in rows]


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes in pages that hold data: the file size minus its free pages (the WAL aside)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)
