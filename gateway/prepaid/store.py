"""The prepaid tables in the journal file, and the SQL that reads and writes them.

Every function takes the connection the journal hands it (`journal.write(fn, ...)` runs it in
the writer thread inside a committed transaction, `journal.read` on the read-only connection).
Money and prices are INTEGER columns; register snapshots are JSON of integer Wh and times.
Payments and balance updates are kept by their idempotency key, so the same key applies once.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from gateway.prepaid.account import Account, PolicyAction, Standing

SCHEMA = """
CREATE TABLE IF NOT EXISTS prepaid_accounts (
    meter TEXT PRIMARY KEY,
    price INTEGER, tariff_prices TEXT NOT NULL DEFAULT '{}',
    alarm INTEGER, trip INTEGER, restore INTEGER,
    balance INTEGER, as_of REAL,
    ref TEXT NOT NULL DEFAULT '{}', latest TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL DEFAULT 'normal', seq INTEGER NOT NULL DEFAULT 0, last_estimate INTEGER,
    rev INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS prepaid_payments (
    payment_id TEXT PRIMARY KEY, meter TEXT NOT NULL, amount INTEGER NOT NULL,
    received REAL NOT NULL, source TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS prepaid_payments_meter ON prepaid_payments (meter, received);
CREATE TABLE IF NOT EXISTS prepaid_updates (
    update_id TEXT PRIMARY KEY, meter TEXT NOT NULL, balance INTEGER NOT NULL, as_of REAL NOT NULL,
    received REAL NOT NULL, source TEXT NOT NULL, applied INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS prepaid_actions (
    request_id TEXT PRIMARY KEY, meter TEXT NOT NULL, seq INTEGER NOT NULL, action TEXT NOT NULL,
    reason TEXT NOT NULL, created REAL NOT NULL, deadline REAL NOT NULL, status TEXT NOT NULL,
    command_id TEXT, result TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS prepaid_actions_meter ON prepaid_actions (meter, created);
"""
ACCOUNT_COLUMNS = ("meter", "price", "tariff_prices", "alarm", "trip", "restore", "balance", "as_of", "ref",
                   "latest", "state", "seq", "last_estimate", "rev", "created", "updated")
ACTION_COLUMNS = ("request_id", "meter", "seq", "action", "reason", "created", "deadline", "status",
                  "command_id", "result", "detail")
KEEP_ACTIONS = 50  # finished actions kept per meter (the audit trail proper is the control journal)


def create(conn: sqlite3.Connection) -> None:
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


def _registers(text: str) -> dict[str, tuple[int, float]]:
    return {q: (int(v[0]), float(v[1])) for q, v in json.loads(text).items()}


def _account(row: sqlite3.Row | tuple[Any, ...]) -> Account:
    d = dict(zip(ACCOUNT_COLUMNS, row, strict=True))
    return Account(
        meter=d["meter"], price=d["price"], tariff_prices={int(k): int(v) for k, v in
                                                           json.loads(d["tariff_prices"]).items()},
        alarm=d["alarm"], trip=d["trip"], restore=d["restore"], balance=d["balance"], as_of=d["as_of"],
        ref=_registers(d["ref"]), latest=_registers(d["latest"]), state=Standing(d["state"]), seq=d["seq"],
        last_estimate=d["last_estimate"], rev=d["rev"], created=d["created"], updated=d["updated"])


def get_account(conn: sqlite3.Connection, meter: str) -> Account | None:
    row = conn.execute(f"SELECT {', '.join(ACCOUNT_COLUMNS)} FROM prepaid_accounts WHERE meter = ?",  # noqa: S608
                       (meter,)).fetchone()
    return None if row is None else _account(row)


def put_account(conn: sqlite3.Connection, a: Account, now: float) -> Account:
    """Insert or replace; bumps `rev` and `updated` on the object it returns."""
    a.rev += 1
    a.updated = now
    a.created = a.created or now
    values = (a.meter, a.price, json.dumps({str(k): v for k, v in a.tariff_prices.items()}), a.alarm, a.trip,
              a.restore, a.balance, a.as_of, json.dumps(a.ref, sort_keys=True), json.dumps(a.latest, sort_keys=True),
              str(a.state), a.seq, a.last_estimate, a.rev, a.created, a.updated)
    marks = ", ".join("?" * len(ACCOUNT_COLUMNS))
    conn.execute(f"INSERT OR REPLACE INTO prepaid_accounts ({', '.join(ACCOUNT_COLUMNS)}) VALUES ({marks})",  # noqa: S608
                 values)
    return a


def all_accounts(conn: sqlite3.Connection) -> list[Account]:
    rows = conn.execute(f"SELECT {', '.join(ACCOUNT_COLUMNS)} FROM prepaid_accounts ORDER BY meter")  # noqa: S608
    return [_account(r) for r in rows]


# ---- idempotency keys ------------------------------------------------------------------------------

def find_payment(conn: sqlite3.Connection, payment_id: str) -> tuple[str, int] | None:
    """(meter, amount) of a payment already recorded under this id."""
    row = conn.execute("SELECT meter, amount FROM prepaid_payments WHERE payment_id = ?", (payment_id,)).fetchone()
    return None if row is None else (row[0], row[1])


def add_payment(conn: sqlite3.Connection, payment_id: str, meter: str, amount: int, *, received: float,
                source: str) -> None:
    conn.execute("INSERT INTO prepaid_payments VALUES (?, ?, ?, ?, ?)", (payment_id, meter, amount, received, source))


def payments_after(conn: sqlite3.Connection, meter: str, after: float) -> int:
    """Fen paid (as meterd received it) after a billing balance's as-of time: not in that balance yet."""
    row = conn.execute("SELECT COALESCE(SUM(amount), 0) FROM prepaid_payments WHERE meter = ? AND received > ?",
                       (meter, after)).fetchone()
    return int(row[0])


def find_update(conn: sqlite3.Connection, update_id: str) -> tuple[str, int, float, bool] | None:
    """(meter, balance, as_of, applied) of a balance update already recorded under this id."""
    row = conn.execute("SELECT meter, balance, as_of, applied FROM prepaid_updates WHERE update_id = ?",
                       (update_id,)).fetchone()
    return None if row is None else (row[0], row[1], row[2], bool(row[3]))


def add_update(conn: sqlite3.Connection, update_id: str, meter: str, balance: int, *, as_of: float,
               received: float, source: str, applied: bool) -> None:
    conn.execute("INSERT INTO prepaid_updates VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (update_id, meter, balance, as_of, received, source, int(applied)))


# ---- policy actions --------------------------------------------------------------------------------

def _action(row: tuple[Any, ...]) -> PolicyAction:
    return PolicyAction(**dict(zip(ACTION_COLUMNS, row, strict=True)))


def add_action(conn: sqlite3.Connection, a: PolicyAction) -> None:
    conn.execute(f"INSERT INTO prepaid_actions ({', '.join(ACTION_COLUMNS)}) "  # noqa: S608
                 f"VALUES ({', '.join('?' * len(ACTION_COLUMNS))})",
                 (a.request_id, a.meter, a.seq, a.action, a.reason, a.created, a.deadline, a.status, a.command_id,
                  a.result, a.detail))


def save_action(conn: sqlite3.Connection, a: PolicyAction) -> None:
    conn.execute("UPDATE prepaid_actions SET status = ?, command_id = ?, result = ?, detail = ? WHERE request_id = ?",
                 (a.status, a.command_id, a.result, a.detail, a.request_id))


def supersede(conn: sqlite3.Connection, meter: str, actions: tuple[str, ...], by: str) -> list[str]:
    """Mark this meter's not-yet-submitted actions of these kinds superseded; their request_ids."""
    marks = ", ".join("?" * len(actions))
    rows = conn.execute(f"SELECT request_id FROM prepaid_actions WHERE meter = ? AND status = 'pending' "  # noqa: S608
                        f"AND action IN ({marks})", (meter, *actions)).fetchall()
    ids = [r[0] for r in rows]
    conn.executemany("UPDATE prepaid_actions SET status = 'superseded', detail = ? WHERE request_id = ?",
                     [(f"superseded by {by} before it was submitted", i) for i in ids])
    return ids


def trim_actions(conn: sqlite3.Connection, meter: str) -> None:
    """Keep the newest KEEP_ACTIONS finished actions of a meter (pending ones are always kept)."""
    conn.execute("DELETE FROM prepaid_actions WHERE meter = ? AND status != 'pending' AND request_id NOT IN "
                 "(SELECT request_id FROM prepaid_actions WHERE meter = ? ORDER BY created DESC, seq DESC LIMIT ?)",
                 (meter, meter, KEEP_ACTIONS))


def all_actions(conn: sqlite3.Connection) -> list[PolicyAction]:
    rows = conn.execute(f"SELECT {', '.join(ACTION_COLUMNS)} FROM prepaid_actions "  # noqa: S608
                        "ORDER BY meter, created, seq, rowid")
    return [_action(r) for r in rows]


def last_action(conn: sqlite3.Connection, meter: str, actions: tuple[str, ...]) -> PolicyAction | None:
    """The newest action of these kinds for a meter, superseded ones included."""
    marks = ", ".join("?" * len(actions))
    row = conn.execute(f"SELECT {', '.join(ACTION_COLUMNS)} FROM prepaid_actions WHERE meter = ? "  # noqa: S608
                       f"AND action IN ({marks}) ORDER BY seq DESC, created DESC LIMIT 1", (meter, *actions)).fetchone()
    return None if row is None else _action(row)
