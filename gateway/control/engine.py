"""Per-meter execution: one lane per meter carries its commands through their states.

A lane works on one command at a time, in submission order; only a trip that a guard
defers (quiet hours, rate limit) lets later commands of that meter pass. Each step is
small (a status read, one 1C, one verification poll) and ends with "again in N s", so
a command that cannot proceed costs a timer, not a task.

Never lost, never twice: `sent` (attempts + 1) is committed before the 1C goes on the
bus, the bus does not retry a 1C by itself, and any resend (after no answer, or after a
restart in `sent`) first reads status word 3 and is skipped when the meter already has
it. Sending holds the lane's lock, and `submit` takes the same lock to supersede, so a
trip is never sent once a later restore of that meter is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from gateway.archive import MeterConfig
from gateway.bus import Bus, BusError, Timing
from gateway.control import wire
from gateway.control.config import ControlConfig
from gateway.control.guards import QuietHours, TripRate
from gateway.control.ledger import Ledger
from gateway.control.model import Action, Command, FailReason, State
from gateway.control.secrets import Passwords
from gateway.control.wire import BECAUSE, describe, received, verified_detail
from protocols.dlt645 import Error2007, PlaintextBuilder, RelayStatus, error_names


@dataclass
class Progress:
    """What a lane knows about an open command beyond its persisted state (lost on restart, on purpose)."""

    next_at: float = 0.0  # clock time of its next step
    deferred: bool = False  # a guard holds it: later commands of the meter may pass
    obstacle: str = ""  # why the last attempt did not get through (a BECAUSE key)
    why: str = ""
    polls: int = 0  # verification polls so far


@dataclass
class Lane:
    meter: str
    commands: list[Command] = field(default_factory=list)
    progress: dict[str, Progress] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def add(self, command: Command) -> None:
        self.commands.append(command)
        self.progress[command.id] = Progress()
        self.wake.set()

    def prune(self) -> None:
        for c in [c for c in self.commands if c.state.terminal]:
            self.commands.remove(c)
            self.progress.pop(c.id, None)


def _held(lane: Lane, locked: bool) -> AbstractAsyncContextManager[object]:
    """The lane's lock, unless the caller already holds it."""
    return contextlib.nullcontext() if locked else lane.lock


class Engine:
    """Runs lanes: guards at execution time, status reads, the 1C, verification."""

    def __init__(self, config: ControlConfig, ledger: Ledger, *, tz: ZoneInfo,
                 meter_for: Callable[[str], MeterConfig | None], bus_for: Callable[[MeterConfig], Bus | None],
                 timing_for: Callable[[MeterConfig], Timing], passwords: Passwords, quiet: QuietHours,
                 rate: TripRate, seen: Callable[[str, RelayStatus], None]) -> None:
        self.config = config
        self.ledger = ledger
        self.counters = ledger.counters
        self.clock = ledger.clock
        self.tz = tz
        self.meter_for = meter_for
        self.bus_for = bus_for
        self.timing_for = timing_for
        self.passwords = passwords
        self.quiet = quiet
        self.rate = rate
        self.seen = seen

    async def run_lane(self, lane: Lane) -> None:
        """Work until the lane has no open command (then return: an idle meter costs no task)."""
        while True:
            lane.wake.clear()
            lane.prune()
            if not lane.commands:
                return
            now = self.clock()
            chosen: Command | None = None
            wait = math.inf
            for c in lane.commands:
                p = lane.progress[c.id]
                if p.next_at <= now:
                    chosen = c
                    break
                wait = min(wait, p.next_at - now)
                if not p.deferred:
                    break  # head of line: later commands wait for it
            if chosen is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lane.wake.wait(), max(wait, 0.0))
                continue
            p = lane.progress[chosen.id]
            p.deferred = False
            delay = await self.step(lane, chosen, p)
            if delay is None and not chosen.state.terminal:  # it moved under us: look again, but not in a spin
                delay = self.config.retry_every
            if delay is not None:
                p.next_at = self.clock() + delay

    async def step(self, lane: Lane, c: Command, p: Progress) -> float | None:
        """One step of `c`; seconds until its next step, None once it is terminal."""
        meter = self.meter_for(c.meter)
        if meter is None:
            await self._end(lane, c, State.FAILED, FailReason.ERROR, f"meter {c.meter} is no longer configured")
            return None
        if c.state is State.ACKNOWLEDGED:
            return await self._verify(lane, c, p, meter)
        now = self.clock()
        past = now >= c.deadline
        if c.state is State.PENDING and past:
            reason = p.obstacle or "never_reached"
            await self._end(lane, c, State.EXPIRED, reason, f"its deadline passed before it could be sent: "
                            f"{BECAUSE.get(reason, reason)}{f' ({p.why})' if p.why else ''}")
            return None
        if c.action is Action.TRIP and not past and self.quiet.quiet(now):
            self.counters["quiet_deferred"] += 1
            return self._defer(c, p, "quiet_hours", self.quiet.why(now), self.quiet.ends(now) - now)
        bus = self.bus_for(meter)
        if bus is None or not bus.link.up:
            why = "no bus for its link" if bus is None else f"link {bus.name} is down"
            if past and p.obstacle:  # in `sent`: frames went out, never answered (a restart gets one more try)
                await self._end(lane, c, State.FAILED, FailReason.LINK_DOWN, f"deadline passed: {why}")
                return None
            return self._obstacle(c, p, "link_down", why)
        timing = self.timing_for(meter)
        if c.action is Action.TRIP or c.state is State.SENT:
            try:
                status = await self._status(bus, meter, timing)
            except BusError as exc:
                if past and p.obstacle:
                    await self._end(lane, c, State.FAILED, exc.reason, f"deadline passed: {exc}")
                    return None
                return self._obstacle(c, p, exc.reason, str(exc))
            if c.state is State.SENT and received(c.action, status):
                return await self._acknowledged(lane, c, p, status, "an earlier 1C reached it: " + describe(status))
            if past:
                await self._end(lane, c, State.FAILED, p.obstacle or FailReason.NO_REPLY,
                                f"deadline passed; sent {c.attempts}x without an answer; {describe(status)}",
                                status=status)
                return None
            if c.action is Action.TRIP and status.hold:
                self.counters["refused_hold"] += 1
                await self._end(lane, c, State.FAILED, FailReason.HOLD, "the meter is on hold (保电): "
                                + describe(status), status=status)
                return None
        if c.action is Action.TRIP and c.attempts == 0 and self.config.rate_mode == "defer":
            wait = self.rate.take(now)
            if wait:
                self.counters["rate_deferred"] += 1
                return self._defer(c, p, "rate_limited", f"more than {self.rate.per_min} trips per minute", wait)
        return await self._send(lane, c, p, meter=meter, bus=bus, timing=timing)

    async def _send(self, lane: Lane, c: Command, p: Progress, *, meter: MeterConfig, bus: Bus,
                    timing: Timing) -> float | None:
        async with lane.lock:
            if c.state not in (State.PENDING, State.SENT):
                return None  # superseded while its status was read
            resend = c.state is State.SENT
            if not await self.ledger.change(c, State.SENT, attempts=c.attempts + 1, sent_at=self.clock()):
                return None
            self.counters["frames_sent"] += 1
            self.counters["resends"] += resend
            deadline = dt.datetime.fromtimestamp(int(c.deadline), self.tz).replace(tzinfo=None)
            builder = PlaintextBuilder(self.passwords.auth_for(meter.password_group), self.config.n2)
            try:
                reply = await wire.send_control(bus, meter, timing, c.action.wire, deadline=deadline,
                                                 builder=builder)
            except BusError as exc:
                return self._obstacle(c, p, exc.reason, str(exc))
            if reply.error is None:
                return await self._acknowledged(lane, c, p, None, "the meter accepted it (9C)", locked=True)
            names = ", ".join(error_names(reply.error))
            if reply.error & Error2007.UNAUTHORIZED:
                await self._end(lane, c, State.FAILED, FailReason.UNAUTHORISED,
                                f"the meter refused the password (ERR {names})", locked=True)
            else:
                await self._end(lane, c, State.FAILED, FailReason.REFUSED, f"the meter refused it (ERR {names})",
                                locked=True)
            return None

    async def _verify(self, lane: Lane, c: Command, p: Progress, meter: MeterConfig) -> float | None:
        bus = self.bus_for(meter)
        status: RelayStatus | None = None
        if bus is not None and bus.link.up:
            with contextlib.suppress(BusError):
                status = await self._status(bus, meter, self.timing_for(meter))
        if status is not None and status.satisfies(c.action.wire):
            await self._end(lane, c, State.VERIFIED, "", verified_detail(c.action, status),
                            status=status, verified_at=self.clock())
            return None
        left = (c.acknowledged_at or c.updated) + self.config.verify_timeout - self.clock()
        if left <= 0:
            await self._end(lane, c, State.FAILED, FailReason.NOT_VERIFIED,
                            f"not shown within {self.config.verify_timeout:g} s of the 9C: {describe(status)}",
                            status=status)
            return None
        if status is not None:
            c.relay = status._asdict()  # progress for readers (e.g. trip commanded, delay running); not a state change
        p.polls += 1
        backoff: float = self.config.verify_poll_first * 2.0 ** (p.polls - 1)
        return min(backoff, self.config.verify_poll_max, left)

    async def _acknowledged(self, lane: Lane, c: Command, p: Progress, status: RelayStatus | None, detail: str,
                            *, locked: bool = False) -> float | None:
        relay = status._asdict() if status is not None else c.relay
        async with _held(lane, locked):
            if c.state not in (State.PENDING, State.SENT):
                return None
            if not await self.ledger.change(c, State.ACKNOWLEDGED, acknowledged_at=self.clock(), detail=detail,
                                            relay=relay, fail_reason=""):
                return None
        p.polls = 0
        p.obstacle = p.why = ""
        return self.config.verify_poll_first

    async def _end(self, lane: Lane, c: Command, state: State, reason: str, detail: str, *,
                   status: RelayStatus | None = None, locked: bool = False, **fields: object) -> None:
        relay = status._asdict() if status is not None else c.relay
        async with _held(lane, locked):
            if not c.state.terminal:
                await self.ledger.change(c, state, fail_reason=str(reason), detail=detail, relay=relay, **fields)

    async def _status(self, bus: Bus, meter: MeterConfig, timing: Timing) -> RelayStatus:
        self.counters["status_reads"] += 1
        try:
            _, status = await wire.read_status(bus, meter, timing)
        except BusError:
            self.counters["status_read_failures"] += 1
            raise
        self.seen(meter.address, status)
        return status

    def _retry_every(self, c: Command) -> float:
        return self.config.trip_retry_every if c.action is Action.TRIP else self.config.retry_every

    def _obstacle(self, c: Command, p: Progress, reason: str, why: str) -> float:
        """Try again after the retry interval, or right at the deadline if that comes first."""
        p.obstacle, p.why = reason, why
        left = c.deadline - self.clock()
        return self._retry_every(c) if left <= 0 else min(self._retry_every(c), left)

    def _defer(self, c: Command, p: Progress, reason: str, why: str, wait: float) -> float:
        p.obstacle, p.why, p.deferred = reason, why, True
        return max(min(wait, c.deadline - self.clock()), 0.0)
