"""Retention of the journal: bounded by age and by bytes, every dropped row counted.

Runs in the journal's writer thread. Rows are dropped by age (`collected`
older than retention_days) and, when the database outgrows max_bytes, oldest
first until it is back under 95 % of the cap: rows a sink has not forwarded
yet are dropped too (bounded disk beats an edge box that stops collecting),
and counted as `dropped_unforwarded`.
"""

from __future__ import annotations

import logging
import math
import sqlite3

from gateway import journal_store as store

log = logging.getLogger(__name__)
TRIM_TO = 0.95  # over the byte cap, drop down to this share of it so the next pass has room
MAX_TRIM_STEPS = 8  # freed index pages lag behind freed rows; re-measure a few times at most
DAY = 86400.0


def _count(conn: sqlite3.Connection, sql: str, args: tuple[float, ...]) -> int:
    return int(conn.execute(sql, args).fetchone()[0])


def _delete(conn: sqlite3.Connection, where: str, arg: float, floor: int | None) -> tuple[int, int]:
    """Delete readings `where` (one transaction); return (deleted, of which not forwarded)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        unforwarded = 0 if floor is None else _count(
            conn, f"SELECT count(*) FROM readings WHERE {where} AND id > ?", (arg, floor))  # noqa: S608 (fixed `where`)
        deleted = conn.execute(f"DELETE FROM readings WHERE {where}", (arg,)).rowcount  # noqa: S608
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return deleted, unforwarded


def retain(conn: sqlite3.Connection, cfg: store.JournalConfig, stats: dict[str, float], now: float) -> dict[str, int]:
    """One retention pass; returns what it dropped and adds it to `stats`."""
    row = conn.execute("SELECT min(position) FROM cursors WHERE stream = ?", (store.READINGS,)).fetchone()
    floor: int | None = row[0]  # rows above the slowest sink's cursor are not forwarded yet
    cutoff = now - cfg.retention_days * DAY
    age, unforwarded = _delete(conn, "collected < ?", cutoff, floor)
    rounds = conn.execute("DELETE FROM rounds WHERE started < ?", (cutoff,)).rowcount
    by_bytes = 0
    for _ in range(MAX_TRIM_STEPS):
        used = store.used_bytes(conn)
        if used <= cfg.max_bytes:
            break
        lo, hi = conn.execute("SELECT min(id), max(id) FROM readings").fetchone()
        if lo is None:
            log.warning("journal: %d bytes with no readings left to drop (max_bytes %d is too small)",
                        used, cfg.max_bytes)
            break
        # ids grow with insertion and retention removes from the low end, so the id span is
        # a fair stand-in for the row count, without a count(*) over millions of rows
        share = (used - cfg.max_bytes * TRIM_TO) / used
        upto = lo + max(1, math.ceil((hi - lo + 1) * share))
        deleted, lost = _delete(conn, "id < ?", upto, floor)
        by_bytes += deleted
        unforwarded += lost
        conn.execute("PRAGMA incremental_vacuum").fetchall()  # hand free pages back to the filesystem
    dropped = {"age": age, "bytes": by_bytes, "unforwarded": unforwarded, "rounds": rounds}
    stats["dropped_age"] += age
    stats["dropped_bytes"] += by_bytes
    stats["dropped_unforwarded"] += unforwarded
    stats["dropped_rounds"] += rounds
    if age or by_bytes or rounds:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        level = logging.WARNING if by_bytes or unforwarded else logging.INFO
        log.log(level, "journal retention: dropped %d readings older than %g days and %d over the %d-byte cap "
                    "(%d of them not yet forwarded by every sink), %d rounds; %d bytes in use",
                    age, cfg.retention_days, by_bytes, cfg.max_bytes, unforwarded, rounds, store.used_bytes(conn))
    return dropped
