"""The in-memory side of the command book: commit a state change, then count, log and publish it.

Every state change goes through `Ledger.change`: the journal commits the row and its
audit event first (compare-and-set on the previous state), and only then does the
in-memory command change, a counter move, a log line appear and subscribers hear of
it. So nothing is ever published that a crash could take back.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any

from gateway.control import store
from gateway.control.model import Command, FailReason, State
from gateway.journal import Journal

log = logging.getLogger("gateway.control")
QUEUE_SIZE = 1000  # changes buffered per subscriber before they are dropped (and counted)
COUNTERS = ("submitted", "duplicates", "rejected", "superseded", "expired", "failed", "acknowledged", "verified",
            "dry_run",
            "refused_quiet_hours", "refused_hold", "refused_rate", "rate_deferred", "quiet_deferred",
            "frames_sent", "resends", "status_reads", "status_read_failures", "customer_closures",
            "changes_dropped", "lane_crashes", "pruned_commands", "pruned_events",
            *(f"failed_{r}" for r in FailReason))
TERMINAL_COUNTER = {State.SUPERSEDED: "superseded", State.EXPIRED: "expired", State.FAILED: "failed",
                    State.VERIFIED: "verified", State.DRY_RUN: "dry_run", State.ACKNOWLEDGED: "acknowledged"}


class Changes:
    """A subscription to every state change from now on.

    An async iterator and an async context manager (leaving it unsubscribes; so does
    `close()`). Its queue is bounded: a consumer that falls behind loses changes,
    counted in `dropped` and in the control counter `changes_dropped`, and never slows
    the engine down. The journal's audit trail (`store.read_events`) has them all.
    """

    def __init__(self, ledger: Ledger, size: int = QUEUE_SIZE) -> None:
        self._ledger = ledger
        self.queue: asyncio.Queue[Command] = asyncio.Queue(size)
        self.dropped = 0
        ledger.subscribers.add(self)

    def offer(self, command: Command) -> None:
        try:
            self.queue.put_nowait(copy.deepcopy(command))
        except asyncio.QueueFull:
            self.dropped += 1
            self._ledger.counters["changes_dropped"] += 1

    def close(self) -> None:
        self._ledger.subscribers.discard(self)

    def __aiter__(self) -> AsyncIterator[Command]:
        return self

    async def __anext__(self) -> Command:
        return await self.queue.get()

    async def __aenter__(self) -> Changes:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()


class Ledger:
    """Open commands in memory, state changes through the journal, counters and subscribers."""

    def __init__(self, journal: Journal, clock: Callable[[], float]) -> None:
        self.journal = journal
        self.clock = clock
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.subscribers: set[Changes] = set()
        self.open: dict[str, Command] = {}
        self.watchers: list[Callable[[Command], None]] = []  # told of every committed change, in order

    async def change(self, command: Command, state: State | None = None, **fields: Any) -> bool:
        """Commit `command` moved to `state` with `fields`; False (nothing changed) if it moved meanwhile."""
        new = copy.copy(command)
        new.relay = dict(command.relay)
        for name, value in fields.items():
            setattr(new, name, value)
        if state is not None:
            new.state = state
        new.updated = self.clock()
        before = command.state
        if not await self.journal.write(store.transition, new, before):
            stored = await self.journal.read(store.get, command.id)  # memory fell behind (a cancelled write)
            if stored is not None:
                command.__dict__.update(stored.__dict__)
                if stored.state.terminal:
                    self.open.pop(command.id, None)
            return False
        command.__dict__.update(new.__dict__)
        self.record(command, moved=new.state is not before)
        return True

    def record(self, command: Command, *, moved: bool = True) -> None:
        """After a commit: memory, counters, one log line per outcome, subscribers."""
        if command.state.terminal:
            self.open.pop(command.id, None)
        else:
            self.open[command.id] = command
        if moved:
            name = TERMINAL_COUNTER.get(command.state)
            if name:
                self.counters[name] += 1
            if command.state is State.FAILED and f"failed_{command.fail_reason}" in self.counters:
                self.counters[f"failed_{command.fail_reason}"] += 1
            self._log(command)
        for watch in self.watchers:
            watch(command)
        self.publish(command)

    def publish(self, command: Command) -> None:
        for subscriber in list(self.subscribers):
            subscriber.offer(command)

    @staticmethod
    def _log(c: Command) -> None:
        what = f"control {c.id}: {c.action} meter {c.meter} ({c.source}, {c.actor or '-'})"
        if c.state in (State.FAILED, State.EXPIRED):
            log.warning("%s %s: %s; %s", what, c.state, c.fail_reason, c.detail)
        elif c.state.terminal:
            log.info("%s %s%s", what, c.state, f": {c.detail}" if c.detail else "")
        else:
            log.debug("%s %s (attempts %d)", what, c.state, c.attempts)

    def subscribe(self) -> Changes:
        return Changes(self)
