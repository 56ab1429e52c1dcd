"""What every sink shares: the journal cursor loop, batching, retries and error classification.

A sink forwards readings, round statistics and control audit events (sinks/control.py) from
the journal with its own cursor per stream, at least once: the cursor moves only after the
server said yes to every unit of the batch (or the unit was rejected for good and counted as
dropped). Errors are classified like Telegraf's InfluxDB output: retry with capped exponential
backoff and jitter (connection errors, 5xx, 408, 429, 404; Retry-After honoured), split on
413, isolate and drop on any other 4xx, on 401/403 keep everything and retry slowly.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import email.utils
import enum
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Literal, Protocol, TypedDict, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from gateway.model import Reading, RoundStats
from gateway.sinks.control import ControlEvents, events_of, public_event

log = logging.getLogger(__name__)
BACKLOG_EVERY = 2.0  # s between backlog counts while a sink is catching up

Unit = TypeVar("Unit")
T = TypeVar("T")
Rows = list[tuple[Any, ...]]  # journal rows: id, then gateway.journal_store.COLUMNS
Batch = tuple[int, int, list[Unit]]  # readings read and encoded: how many, the last id, the units
State = Literal["ok", "retrying", "unauthorized", "stopped"]
RETRY_AFTER_CAP = 600.0
ADVANCES_IN_FLIGHT = 8  # cursor moves queued for the journal's next commit while later batches are sent


class Journal(Protocol):
    """The part of the journal a sink uses: per-cursor reads and cursor moves."""

    async def read_batch(self, cursor: str, limit: int) -> list[tuple[int, Reading]]: ...
    async def advance(self, cursor: str, upto_id: int) -> None: ...
    async def backlog(self, cursor: str) -> int: ...
    async def read_rounds(self, cursor: str, limit: int) -> list[tuple[int, RoundStats]]: ...
    async def advance_rounds(self, cursor: str, upto_id: int) -> None: ...


@runtime_checkable
class RowJournal(Protocol):
    """A journal that hands a sink its rows to encode where it reads them (gateway.journal.Journal)."""

    async def read_rows(self, cursor: str, limit: int, encode: Callable[[Rows], T],
                        after: int | None = None) -> tuple[int, int, T]: ...


class SinkSettings(BaseModel):
    """Settings every sink kind has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    batch_lines: int = Field(default=5000, ge=1, le=100_000)
    flush_interval: float = Field(default=1.0, gt=0)
    retry_initial: float = Field(default=1.0, gt=0)
    retry_max: float = Field(default=60.0, gt=0)
    unauthorized_retry: float = Field(default=60.0, gt=0)
    drain_on_stop: float = Field(default=5.0, ge=0, le=300)  # s at SIGTERM to send the backlog (rest: next start)


class Verdict(enum.Enum):
    RETRY = "retry"  # the batch is fine, the server or the path is not: wait and resend
    SPLIT = "split"  # too large: halve and resend
    DROP = "drop"  # malformed / rejected data: isolate the bad line(s), drop and count them
    UNAUTHORIZED = "unauthorized"  # credentials: keep everything, retry slowly


def classify(status: int | None) -> Verdict:
    """HTTP status (None = no response: connection error, timeout) -> what to do."""
    if status in (401, 403):
        return Verdict.UNAUTHORIZED
    if status == 413:
        return Verdict.SPLIT
    if status is not None and 400 <= status < 500 and status not in (404, 408, 429):
        return Verdict.DROP
    # No answer, 5xx, 408, 429, 404 (database/bucket missing: setup, never a reason to drop),
    # and anything unexpected (1xx/3xx): keep the data and try again.
    return Verdict.RETRY


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (seconds or an HTTP date) -> seconds to wait, capped at 10 min."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_CAP)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, min(when - (time.time() if now is None else now), RETRY_AFTER_CAP))


def backoff(settings: SinkSettings, failures: int) -> float:
    """Capped exponential backoff with jitter: failure n waits 50-100 % of initial * 2^(n-1), at most max."""
    ceiling = min(settings.retry_max, settings.retry_initial * 2.0 ** min(max(failures, 1) - 1, 30))
    return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - jitter, not crypto


class WriteFailure(Exception):
    """A send that did not succeed; `status` is the HTTP status, None without a response."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class SinkCounters(TypedDict):
    sent_lines: int  # units accepted by the server (lines; MQTT: messages)
    sent_batches: int  # successful requests (a split batch counts each part)
    retries: int
    dropped_lines: int
    last_error: str
    state: State
    backlog: int  # readings this sink has not forwarded yet
    control_backlog: int  # control audit events this sink has not forwarded yet
    last_success: float | None  # wall-clock time of the last accepted send


class Sink(abc.ABC, Generic[Unit]):
    """Forward journal entries to one destination; subclasses encode and send."""

    def __init__(self, settings: SinkSettings) -> None:
        self.settings = settings
        self.name = settings.name
        self.cursor = f"sink:{settings.name}"
        self.counters: SinkCounters = {
            "sent_lines": 0, "sent_batches": 0, "retries": 0, "dropped_lines": 0, "last_error": "",
            "state": "stopped", "backlog": 0, "control_backlog": 0, "last_success": None,
        }
        self._failures = 0  # consecutive failed attempts, drives the backoff
        self._wakeup = asyncio.Event()  # a subclass sets it when resending may now work
        self._journal: Journal | None = None  # while run() forwards from it: keeps `backlog` fresh during retries
        self._control: ControlEvents | None = None  # the journal's control stream, when it has one
        self._counted = 0.0  # monotonic time of the last backlog count
        self._ahead: asyncio.Future[Batch[Unit]] | None = None  # the next readings, read while a batch is sent
        self._advancing: deque[asyncio.Future[None]] = deque()  # cursor moves not committed yet, oldest first

    # --- what a sink kind provides -----------------------------------------------------------
    @abc.abstractmethod
    def encode_readings(self, readings: list[Reading]) -> list[Unit]: ...

    def row_encoder(self) -> Callable[[Rows], list[Unit]] | None:
        """Journal rows -> the units `encode_readings` gives for their readings, or None (readings only).
        It runs in the journal's reader thread: no event loop, no state of the sink."""
        return None

    @abc.abstractmethod
    def encode_rounds(self, rounds: list[RoundStats]) -> list[Unit]: ...

    @abc.abstractmethod
    def encode_events(self, events: list[dict[str, Any]]) -> list[Unit]:
        """Control audit events (gateway/sinks/control.py) -> one unit per event; leave out (and log)
        an event that cannot be encoded."""

    @abc.abstractmethod
    async def send(self, units: list[Unit]) -> None:
        """Deliver all units or raise WriteFailure."""

    async def open(self) -> None:
        """Prepare clients; no network I/O needed here."""

    async def close(self) -> None:
        """Release clients."""

    async def reauthorize(self) -> None:
        """Called before a retry after 401/403 (e.g. re-read a token file)."""

    def describe(self, unit: Unit) -> str:
        return str(unit)[:300]

    # --- the loop --------------------------------------------------------------------------------
    async def run(self, journal: Journal, stop: asyncio.Event) -> None:
        """Forward until `stop` is set; returns after closing the sink's clients."""
        self.counters["state"] = "ok"
        self._journal = journal
        self._control = events_of(journal)
        try:
            await self.open()
            while not stop.is_set():
                more = await self._forward_rounds(journal, stop)
                more = await self._forward_control(stop) or more  # few, and people wait for them
                more = await self._forward_readings(journal, stop) or more
                if not more:
                    self.counters["backlog"] = await journal.backlog(self.cursor)
                    await self._count_control()
                    await self.pause(stop, self.settings.flush_interval)
        finally:
            self._drop_ahead()
            await asyncio.gather(*self._advancing, return_exceptions=True)  # moves already earned: keep them
            self._advancing.clear()
            self.counters["state"] = "stopped"
            await self.close()

    async def _forward_rounds(self, journal: Journal, stop: asyncio.Event) -> bool:
        """Send one batch of round statistics; True when it was full (more is probably waiting)."""
        limit = self.settings.batch_lines
        stats = await journal.read_rounds(self.cursor, limit)
        if not stats or not await self.deliver(self.encode_rounds([s for _, s in stats]), stop):
            return False
        await journal.advance_rounds(self.cursor, max(i for i, _ in stats))
        return len(stats) >= limit

    async def _forward_readings(self, journal: Journal, stop: asyncio.Event) -> bool:
        """Send one batch of readings; True when it was full. With a RowJournal, rows are encoded in the
        journal's reader thread and after a full batch the next one is read while this one is sent. The
        cursor moves in order, only once the server took (or dropped) the whole batch, but the next batch
        does not wait for that move's commit (commits are spaced by the journal's commit window): a crash
        before it commits sends the batch again, which at-least-once allows."""
        limit = self.settings.batch_lines
        ahead, self._ahead = self._ahead, None
        entries, last, units = await ahead if ahead is not None else await self._read_readings(journal, limit, None)
        if not entries:
            return False
        full = entries >= limit
        if full and isinstance(journal, RowJournal) and self.row_encoder() is not None:
            self._ahead = asyncio.ensure_future(self._read_readings(journal, limit, last))
        if not await self.deliver(units, stop):
            self._drop_ahead()
            return False
        self._advancing.append(asyncio.ensure_future(journal.advance(self.cursor, last)))
        await self._advanced(ADVANCES_IN_FLIGHT if self._ahead is not None else 0)
        now = time.monotonic()
        if not full:
            self.counters["backlog"] = 0  # caught up with what was there
        elif now - self._counted >= BACKLOG_EVERY:  # counting costs O(backlog): not after every batch
            self._counted = now
            self.counters["backlog"] = await journal.backlog(self.cursor)
        return full

    async def _read_readings(self, journal: Journal, limit: int, after: int | None) -> Batch[Unit]:
        """The readings after `after` (None: after the cursor, once every move of it is committed), encoded."""
        if after is None:
            await self._advanced()
        encoder = self.row_encoder()
        if encoder is not None and isinstance(journal, RowJournal):
            return await journal.read_rows(self.cursor, limit, encoder, after)
        readings = await journal.read_batch(self.cursor, limit)
        if not readings:
            return 0, 0, []
        return len(readings), max(i for i, _ in readings), self.encode_readings([r for _, r in readings])

    async def _advanced(self, keep: int = 0) -> None:
        """Wait for cursor moves until at most `keep` are in flight; a move that failed raises here."""
        while self._advancing and (len(self._advancing) > keep or self._advancing[0].done()):
            await self._advancing.popleft()

    def _drop_ahead(self) -> None:
        """Forget a batch read ahead (its batch was not sent): it is read again from the cursor."""
        if self._ahead is not None:
            self._ahead.cancel()
            self._ahead.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved"
            self._ahead = None

    async def _forward_control(self, stop: asyncio.Event) -> bool:
        """Send one batch of control events; True when it was full. A failure to read them is logged
        and retried on the next pass: it never holds up readings."""
        if self._control is None:
            return False
        limit = self.settings.batch_lines
        try:
            events = await self._control.read(self.cursor, limit)
        except Exception as exc:  # a broken control table must not stop the readings
            self._control_trouble(exc)
            return False
        if not events:
            return False
        units = self.encode_events([public_event(seq, event) for seq, event in events])
        self.counters["dropped_lines"] += len(events) - len(units)  # one unit per event; encode_events logged why
        if not await self.deliver(units, stop):
            return False
        await self._control.advance(self.cursor, max(seq for seq, _ in events))
        if len(events) < limit:
            self.counters["control_backlog"] = 0
        return len(events) >= limit

    async def _count_control(self) -> None:
        if self._control is not None:
            try:
                self.counters["control_backlog"] = await self._control.backlog(self.cursor)
            except Exception as exc:  # counted and logged; the next pass tries again
                self._control_trouble(exc)

    def _control_trouble(self, exc: Exception) -> None:
        text = f"control events: {type(exc).__name__}: {exc}"
        level = logging.DEBUG if self.counters["last_error"] == text else logging.WARNING
        log.log(level, "sink %s: cannot read %s", self.name, text)
        self.counters["last_error"] = text

    async def deliver(self, units: list[Unit], stop: asyncio.Event) -> bool:
        """Send `units`, splitting and dropping as classified; False if stopped before the end."""
        pending: deque[list[Unit]] = deque([units] if units else [])
        dropped: list[str] = []
        while pending:
            chunk = pending.popleft()
            outcome = await self._attempt(chunk)
            if outcome is None:
                self._sent(len(chunk))
                continue
            failure, verdict = outcome
            if verdict in (Verdict.SPLIT, Verdict.DROP):
                self.counters["last_error"] = str(failure)
                if len(chunk) > 1:
                    half = len(chunk) // 2
                    pending.extendleft((chunk[half:], chunk[:half]))
                else:
                    self.counters["dropped_lines"] += 1
                    dropped.append(f"{self.describe(chunk[0])} ({failure})")
                continue
            pending.appendleft(chunk)
            await self._refresh_backlog()  # what waits grows while the server is away: ops must see it
            self.counters["retries"] += 1
            self._failures += 1
            self.set_failing(str(failure), "unauthorized" if verdict is Verdict.UNAUTHORIZED else "retrying")
            if not await self.pause(stop, self.retry_delay(failure, verdict)):
                return False
            if verdict is Verdict.UNAUTHORIZED:
                await self.reauthorize()
        if dropped:
            log.warning("sink %s: dropped %d line(s) the server rejected; first: %s",
                        self.name, len(dropped), dropped[0])
            for line in dropped[1:]:
                log.debug("sink %s: dropped %s", self.name, line)
        return True

    async def _attempt(self, chunk: list[Unit]) -> tuple[WriteFailure, Verdict] | None:
        """One send: None on success, else the failure and its verdict."""
        try:
            await self.send(chunk)
        except WriteFailure as failure:
            return failure, classify(failure.status)
        except Exception as exc:  # a library surprise must not lose the batch: retry it
            level = logging.DEBUG if self.counters["state"] == "retrying" else logging.WARNING
            log.log(level, "sink %s: unexpected error while sending", self.name, exc_info=True)
            return WriteFailure(f"{type(exc).__name__}: {exc}"), Verdict.RETRY
        return None

    def retry_delay(self, failure: WriteFailure, verdict: Verdict) -> float:
        if verdict is Verdict.UNAUTHORIZED:
            return self.settings.unauthorized_retry
        return max(backoff(self.settings, self._failures), failure.retry_after or 0.0)

    async def pause(self, stop: asyncio.Event, seconds: float) -> bool:
        """Wait `seconds`, less if stopped or woken (a wake is consumed); False when stopped."""
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wakeup.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
            self._wakeup.clear()
        finally:
            for waiter in waits:
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
        return not stop.is_set()

    async def _refresh_backlog(self) -> None:
        if self._journal is not None:
            try:
                self.counters["backlog"] = await self._journal.backlog(self.cursor)
            except Exception:  # a failing count must not stop the retries; the next one tries again
                log.debug("sink %s: cannot count the backlog", self.name, exc_info=True)

    def wake(self) -> None:
        """Cut a retry or idle pause short (e.g. the connection is back)."""
        self._wakeup.set()

    # --- state and logs: one warning when failing starts, one info on recovery --------------------
    def set_failing(self, error: str, state: State = "retrying") -> None:
        self.counters["last_error"] = error
        if self.counters["state"] != state:
            log.warning("sink %s: %s: %s (keeping the backlog, retrying)", self.name, state, error)
            self.counters["state"] = state

    def set_ok(self) -> None:
        self._failures = 0
        if self.counters["state"] in ("retrying", "unauthorized"):
            log.info("sink %s: recovered, sending again", self.name)
            self.counters["state"] = "ok"

    def _sent(self, count: int) -> None:
        self.counters["sent_lines"] += count
        self.counters["sent_batches"] += 1
        self.counters["last_success"] = time.time()
        self.set_ok()
