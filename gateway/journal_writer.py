"""The journal's one writer thread: group commit of everything that changes the file.

Requests arrive on a thread-safe queue, each with an asyncio future of the
loop that asked. The thread takes the first request, then gathers more for the
commit window (or until `batch_max` readings) and runs them all in one
transaction: many appends share one fsync. The futures are resolved only after
COMMIT returned, so an acknowledged append is on disk. A failed transaction
fails every request in it with JournalError and the thread carries on; the
next request reconnects if the connection was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from gateway import journal_store as store
from gateway.journal_retention import retain

log = logging.getLogger(__name__)
SOLO = frozenset({"open", "retain", "stop"})  # run alone, outside a group transaction


@dataclass(slots=True)
class Op:
    """One request: kind is open | append | cursor | advance | round | call | retain | stop.

    `call` runs `args[0](conn, *args[1:])` inside the group transaction; its return value is the result.
    """

    kind: str
    future: asyncio.Future[Any]
    rows: list[store.Row] = field(default_factory=list)
    args: tuple[Any, ...] = ()


@dataclass(slots=True)
class _Failed:
    """A `call` that raised: only its own request fails."""

    error: BaseException


Settlement = tuple[asyncio.Future[Any], Any, BaseException | None]  # future, result, error


def _settle(op: Op, result: Any = None, error: BaseException | None = None) -> None:
    _settle_all([(op.future, result, error)])


def _settle_all(settlements: list[Settlement]) -> None:
    """Resolve futures from the writer thread: ONE call_soon_threadsafe per event loop, not per request.

    Each call takes the loop's lock and writes its self-pipe (a syscall and a wake-up); a commit group
    of a few hundred appends paid that a few hundred times.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[Settlement]] = {}
    for settlement in settlements:
        loop = settlement[0].get_loop()
        batch = by_loop.get(loop)
        if batch is None:
            by_loop[loop] = [settlement]
        else:
            batch.append(settlement)
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, batch)
        except RuntimeError:  # that loop is closed: nobody is waiting any more
            log.debug("journal: %d request(s) outlived their event loop", len(batch))


def _resolve(batch: list[Settlement]) -> None:
    """In the loop's thread."""
    for future, result, error in batch:
        if future.done():  # the caller was cancelled: the work is done (or not) all the same
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class Writer:
    """Owns the read-write connection and the lock file; every method below runs in its thread."""

    def __init__(self, path: Path, limits: store.JournalConfig, stats: dict[str, float]) -> None:
        self.path, self.limits, self.stats = path, limits, stats
        self.queue: queue.SimpleQueue[Op] = queue.SimpleQueue()
        self._conn: sqlite3.Connection | None = None
        self._lock: TextIO | None = None
        self._last_commit = -1e9
        self.last_error: str | None = None  # why the last transaction failed; None once one commits
        self.thread = self._start()

    def _start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        thread.start()
        return thread

    def submit(self, op: Op) -> None:
        if not self.thread.is_alive():  # never expected: _run catches everything per request
            log.error("journal: the writer thread had died; starting a new one")
            self.thread = self._start()
        self.queue.put(op)

    # ---- the loop ----

    def _run(self) -> None:
        pending: Op | None = None
        while True:
            op = pending or self.queue.get()
            pending = None
            if op.kind == "stop":
                self._close()
                _settle(op)
                return
            if op.kind in SOLO:
                self._solo(op)
                continue
            group = [op]
            pending = self._gather(group)
            self._commit(group)

    def _gather(self, group: list[Op]) -> Op | None:
        """Add requests to the group; return a solo request met on the way (it runs next).

        An append that finds the writer idle commits at once (latency = one fsync). Under
        continuous load commits are spaced by the commit window, and each one takes every
        request that arrived meanwhile, up to batch_max readings.
        """
        since = time.monotonic() - self._last_commit
        deadline = time.monotonic() + max(0.0, self.limits.commit_interval - since)
        count = len(group[0].rows)
        while count < self.limits.batch_max:
            wait = deadline - time.monotonic()
            try:
                op = self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if op.kind in SOLO:
                return op
            group.append(op)
            count += len(op.rows)
        return None

    def _commit(self, group: list[Op]) -> None:
        started = self._last_commit = time.monotonic()
        inserted = offered = 0
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            results: list[Any] = []
            rows: list[store.Row] = []  # appends in a row, inserted together (store.insert_rows)
            for op in group:
                if op.kind == "append":
                    rows += op.rows
                    results.append(None)
                    continue
                if rows:
                    inserted += self._insert(conn, rows)
                    offered, rows = offered + len(rows), []
                results.append(self._apply(conn, op))
            if rows:
                inserted += self._insert(conn, rows)
                offered += len(rows)
            conn.execute("COMMIT")
        except Exception as exc:  # every failure is reported to every waiter
            self._failed(group, exc)
            return
        self.last_error = None
        self.stats["appended"] += inserted
        self.stats["duplicates"] += offered - inserted
        self.stats["batches"] += 1
        self.stats["commit_seconds_total"] += time.monotonic() - started
        _settle_all([(op.future, None, result.error) if isinstance(result, _Failed) else (op.future, result, None)
                     for op, result in zip(group, results, strict=True)])

    @staticmethod
    def _insert(conn: sqlite3.Connection, rows: list[store.Row]) -> int:
        """Insert readings; how many were new (a duplicate (meter, quantity, time) is ignored).

        One call for all the appends of a group (multi-row statements, see `insert_rows`)."""
        before = conn.total_changes
        store.insert_rows(conn, rows)
        return conn.total_changes - before

    @staticmethod
    def _apply(conn: sqlite3.Connection, op: Op) -> Any:
        if op.kind == "call":  # in a savepoint: its own failure is its caller's, not the group's
            conn.execute("SAVEPOINT call")
            try:
                result = op.args[0](conn, *op.args[1:])
            except Exception as exc:
                conn.execute("ROLLBACK TO call")
                conn.execute("RELEASE call")
                return _Failed(exc)
            conn.execute("RELEASE call")
            return result
        if op.kind == "cursor":
            store.ensure_cursor(conn, *op.args)
        elif op.kind == "advance":
            store.advance(conn, *op.args)
        elif op.kind == "round":
            store.upsert_round(conn, *op.args)
        else:
            raise store.JournalError(f"unknown journal request {op.kind!r}")
        return None

    def _failed(self, group: list[Op], exc: BaseException) -> None:
        error = store.explain(exc, self.path)
        self.stats["write_errors"] += 1
        self.last_error = str(error)
        log.error("journal: a transaction of %d request(s) failed: %s", len(group), error)
        if self._conn is not None:
            try:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
            except sqlite3.Error as rollback_exc:
                log.warning("journal: rollback failed (%s); reconnecting on the next request", rollback_exc)
                self._drop_connection()
        _settle_all([(op.future, None, error) for op in group])

    def _solo(self, op: Op) -> None:
        try:
            if op.kind == "open":
                self._open()
                result: Any = None
            else:
                result = retain(self._connection(), self.limits, self.stats, *op.args)
        except Exception as exc:  # reported to the waiter, logged, thread lives on
            error = store.explain(exc, self.path)
            log.error("journal: %s failed: %s", op.kind, error)
            if op.kind == "open":
                self._close()
            _settle(op, error=error)
            return
        _settle(op, result)

    # ---- connection and lock ----

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock").open("a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise store.JournalError(f"the journal {self.path} is in use by another process "
                                     "(is another meterd running with this state directory?)") from None
        self._lock = lock
        self._connection()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = store.connect(self.path, readonly=False)
            try:
                store.prepare(conn, self.path)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def _close(self) -> None:
        self._drop_connection()
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None


def file_bytes(path: Path) -> int:
    """The journal's size on disk, WAL included (for metrics)."""
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(f"{path}{suffix}").st_size
    return total
