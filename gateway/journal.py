"""The journal: the durable buffer in front of every sink, and the embedded default store.

Every reading is committed to `<state_dir>/journal.sqlite` before it counts as
collected. Sinks forward from it with their own cursors (at-least-once) and
can forward round statistics the same way. Retention bounds it by age and
bytes and counts whatever it drops (`Journal.stats`).

Durability: WAL mode with `synchronous=FULL`. In WAL mode FULL fsyncs the WAL
at every commit, so a commit that returned is on stable storage: it survives
SIGKILL of meterd *and* power loss of the box. NORMAL would survive SIGKILL
(the committed pages are in the OS page cache) but loses the last commits on
power loss, and an explicit checkpoint cannot close that window because it
only runs now and then. The price of FULL is one fsync per transaction; group
commit (see journal_writer.py) makes that one fsync per commit window, not
per append, which is also what saves the flash of an edge box.

Threads: one writer thread owns the read-write connection (journal_writer.py);
one reader thread owns a read-only connection for queries and sink batches.
Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from gateway import journal_store as store
from gateway.journal_store import READINGS, ROUNDS, BadReading, JournalConfig, JournalError
from gateway.journal_writer import Op, Writer, file_bytes
from gateway.model import Reading, RoundStats

__all__ = ["BadReading", "Journal", "JournalConfig", "JournalError"]
log = logging.getLogger(__name__)
T = TypeVar("T")
FILENAME = "journal.sqlite"
APPEND_LINGER = 0.005  # s appends gather before they go to the writer together
COUNTERS = ("appended", "duplicates", "batches", "dropped_age", "dropped_bytes", "dropped_unforwarded",
            "dropped_rounds", "write_errors")


class Journal:
    """SQLite (WAL) journal of readings and round statistics. Use `async with` or open()/close()."""

    def __init__(self, path: Path, config: JournalConfig | None = None) -> None:
        self.path = Path(path)
        self.config = config or JournalConfig()
        # Counters since this process started (Prometheus-style); the writer thread updates them.
        self.stats: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self.stats["commit_seconds_total"] = 0.0
        self._writer: Writer | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._rconn: sqlite3.Connection | None = None
        self._cursors: set[tuple[str, str]] = set()
        self._batches: dict[asyncio.AbstractEventLoop, Op] = {}  # appends gathered on each loop, not handed over
        self._loop_of: dict[int, asyncio.AbstractEventLoop] = {}  # thread -> the loop it ran appends on

    async def __aenter__(self) -> Journal:
        await self.open()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    @property
    def alive(self) -> bool:
        """For /healthz: open, the writer thread running and its last transaction committed."""
        w = self._writer
        return w is not None and w.thread.is_alive() and w.last_error is None

    @property
    def last_error(self) -> str | None:
        """Why the last transaction failed, until one commits again."""
        return None if self._writer is None else self._writer.last_error

    # ---- life cycle ----

    async def open(self) -> None:
        """Create the directory and file if needed; JournalError if it is corrupt, locked or unwritable."""
        if self._writer is not None:
            raise JournalError(f"the journal {self.path} is already open")
        self._writer = Writer(self.path, self.config, self.stats)
        try:
            await self._submit("open")
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="journal-reader")
            self._rconn = await self._in_reader(lambda: store.connect(self.path, readonly=True))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Commit what is queued, then stop the writer thread and close both connections."""
        for loop in list(self._batches):  # what was gathered goes before the stop
            self._flush(loop)
        writer, self._writer = self._writer, None
        if writer is not None:
            done = asyncio.get_running_loop().create_future()
            writer.submit(Op("stop", done))
            await done
            await asyncio.to_thread(writer.thread.join)
        reader, conn, self._reader, self._rconn = self._reader, self._rconn, None, None
        if reader is not None:
            if conn is not None:
                await asyncio.get_running_loop().run_in_executor(reader, conn.close)
            reader.shutdown(wait=False)
        self._cursors.clear()

    # ---- readings ----

    async def append(self, readings: list[Reading]) -> None:
        """Return once these readings are committed (fsynced). A re-read of the same
        (meter, quantity, time) is ignored and counted in stats["duplicates"].
        If the caller is cancelled the rows may still be committed; appending again is harmless."""
        if readings:
            await asyncio.shield(self.append_nowait(readings))  # the future is shared: never cancel it

    def append_nowait(self, readings: list[Reading]) -> asyncio.Future[None]:
        """`append` for a caller that goes on meanwhile: the future is done once the rows are committed.

        BadReading (and a closed journal) is raised here, before anything is queued. The appends of a few
        milliseconds (APPEND_LINGER, far less than a commit takes) go to the writer as one request with one
        future, shared by their callers (add a callback, or shield it before awaiting it): one hand-over to
        the thread and one wake-up of it, not one each. Any other request hands them over first."""
        rows = [store.to_row(r) for r in readings]
        if self._writer is None:
            raise JournalError(f"the journal {self.path} is not open")
        loop = self._loop_of.get(threading.get_ident())
        if loop is None or not loop.is_running():  # one running loop per thread at a time
            loop = self._loop_of[threading.get_ident()] = asyncio.get_running_loop()  # (a getpid() call)
        batch = self._batches.get(loop)
        if batch is None or len(batch.rows) >= self.config.batch_max:
            self._flush(loop)
            batch = self._batches[loop] = Op("append", loop.create_future(), [])
            loop.call_later(APPEND_LINGER, self._flush, loop)
        batch.rows += rows
        future: asyncio.Future[None] = batch.future
        return future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand the appends gathered on `loop` to the writer, if any are waiting."""
        batch = self._batches.pop(loop, None)
        if batch is None:
            return
        if self._writer is None:
            if not batch.future.done():
                batch.future.set_exception(JournalError(f"the journal {self.path} was closed"))
            return
        self._writer.submit(batch)

    async def read_batch(self, cursor: str, limit: int) -> list[tuple[int, Reading]]:
        """Readings after this sink's cursor, oldest first, as (id, reading)."""
        await self._ensure_cursor(READINGS, cursor)
        return await self._read(store.read_batch, cursor, limit)

    async def read_rows(self, cursor: str, limit: int, encode: Callable[[list[store.Row]], T],
                        after: int | None = None) -> tuple[int, int, T]:
        """Like read_batch for a sink that encodes journal rows itself: `encode` gets the rows (id, then
        journal_store.COLUMNS) in the reader thread, so no `Reading` is built and the event loop does
        none of the work. `after`: read past this id instead of the cursor (the next batch, read while the
        previous one is still being sent). Returns (rows read, last id or 0, encode(rows))."""
        await self._ensure_cursor(READINGS, cursor)

        def rows_after(conn: sqlite3.Connection) -> tuple[int, int, T]:
            start = store.position(conn, READINGS, cursor) if after is None else after
            rows = conn.execute(store.READ_BATCH, (start, limit)).fetchall()
            return len(rows), rows[-1][0] if rows else 0, encode(rows)

        return await self._read(rows_after)

    async def advance(self, cursor: str, upto_id: int) -> None:
        """Durably mark everything up to upto_id as forwarded by this sink (never moves back)."""
        await self._submit("advance", args=(READINGS, cursor, upto_id))
        self._cursors.add((READINGS, cursor))

    async def backlog(self, cursor: str) -> int:
        """Readings this sink has not forwarded yet."""
        await self._ensure_cursor(READINGS, cursor)
        return await self._read(store.backlog, READINGS, cursor)

    async def query(self, meter: str | None = None, since: float | None = None, until: float | None = None,
                    quantity: str | None = None, limit: int = 1000) -> list[Reading]:
        """The newest `limit` readings with since <= time <= until, returned newest last."""
        return await self._read(lambda conn: store.query(conn, meter=meter, since=since, until=until,
                                                          quantity=quantity, limit=limit))

    async def meters(self) -> list[str]:
        """Every meter with at least one reading in the journal, sorted."""
        return await self._read(store.meters)

    # ---- round statistics ----

    async def record_round(self, stats: RoundStats) -> None:
        """Insert or replace the round with this round_id; sinks see every update again."""
        await self._submit("round", args=(stats,))

    async def read_rounds(self, cursor: str, limit: int) -> list[tuple[int, RoundStats]]:
        await self._ensure_cursor(ROUNDS, cursor)
        return await self._read(store.read_rounds, cursor, limit)

    async def advance_rounds(self, cursor: str, upto_id: int) -> None:
        await self._submit("advance", args=(ROUNDS, cursor, upto_id))
        self._cursors.add((ROUNDS, cursor))

    async def rounds_backlog(self, cursor: str) -> int:
        await self._ensure_cursor(ROUNDS, cursor)
        return await self._read(store.backlog, ROUNDS, cursor)

    async def recent_rounds(self, plan: str | None = None, limit: int = 20) -> list[RoundStats]:
        """The latest rounds (of one plan, or all), newest first."""
        return await self._read(store.recent_rounds, plan, limit)

    # ---- retention and size ----

    async def retain(self, now: float | None = None) -> dict[str, int]:
        """One retention pass in the writer thread; returns what it dropped (also in stats)."""
        result: dict[str, int] = await self._submit("retain", args=(time.time() if now is None else now,))
        return result

    async def run_retention(self, stop: asyncio.Event, every: float = 60.0) -> None:
        """Retention every `every` seconds until `stop` is set; a failed pass is logged, not fatal."""
        while not stop.is_set():
            try:
                await self.retain()
            except JournalError as exc:
                log.error("journal retention pass failed, retrying in %gs: %s", every, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)

    async def size(self) -> dict[str, int]:
        """`used`: bytes in data pages (what max_bytes bounds); `file`: database + WAL on disk."""
        used = await self._read(store.used_bytes)
        return {"used": used, "file": await asyncio.to_thread(file_bytes, self.path)}

    # ---- other tables (control commands, prepaid accounts) ----

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(conn, *args)` in the writer thread inside a group transaction; return once committed.

        For modules that keep their own tables in the journal (control, prepaid): their schema and
        SQL stay with them, durability and threading stay here. An exception rolls the group back.
        """
        result: T = await self._submit("call", args=(fn, *args))
        return result

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(conn, *args)` on the read-only connection in the reader thread."""
        return await self._read(fn, *args)

    # ---- plumbing ----

    async def _submit(self, kind: str, rows: list[store.Row] | None = None, args: tuple[Any, ...] = ()) -> Any:
        return await self._queue(kind, rows, args)

    def _queue(self, kind: str, rows: list[store.Row] | None = None, args: tuple[Any, ...] = ()) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        self._flush(loop)  # requests reach the writer in the order they were made
        if self._writer is None:
            raise JournalError(f"the journal {self.path} is not open")
        future: asyncio.Future[Any] = loop.create_future()
        self._writer.submit(Op(kind, future, rows or [], args))
        return future

    async def _ensure_cursor(self, stream: str, name: str) -> None:
        """A sink's cursor starts at 0 (the whole journal) and is stored the first time it is used."""
        if (stream, name) not in self._cursors:
            await self._submit("cursor", args=(stream, name))
            self._cursors.add((stream, name))

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self._rconn
        if conn is None:
            raise JournalError(f"the journal {self.path} is not open")
        return await self._in_reader(lambda: fn(conn, *args))

    async def _in_reader(self, call: Callable[[], T]) -> T:
        def guarded() -> T:
            try:
                return call()
            except sqlite3.Error as exc:
                raise store.explain(exc, self.path) from exc

        if self._reader is None:
            raise JournalError(f"the journal {self.path} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._reader, guarded)
