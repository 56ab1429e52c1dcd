"""`Control`: the one object the daemon, the API, MQTT, the CLI and prepaid talk to.

`submit` commits a command (guards that refuse decide here, so a refusal is as durable
as an acceptance) and wakes the meter's lane; `run` drives the lanes; `start` resumes
whatever a previous process left open. See engine.py for how a command is carried out.

Wiring (the daemon)::

    control = Control(config.control, journal, station=..., tz=config.tz, meter_for=meters.get,
                      bus_for=lambda m: buses.get(m.link), timing_for=timing_of)
    await control.start()                    # after journal.open(); SecretsError came from __init__
    supervise(control.run(stop))             # and control.observe(readings) for every journaled batch
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import copy
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any
from zoneinfo import ZoneInfo

from gateway.archive import MeterConfig
from gateway.bus import Bus, Timing
from gateway.control import store
from gateway.control.config import ControlConfig
from gateway.control.engine import Engine, Lane
from gateway.control.guards import QuietHours, TripRate
from gateway.control.ledger import Changes, Ledger
from gateway.control.model import (
    Action,
    Command,
    ControlError,
    FailReason,
    NotFound,
    State,
    UnknownAction,
    UnknownMeter,
)
from gateway.control.secrets import Passwords, load_groups
from gateway.control.wire import STATUS_NAME
from gateway.journal import Journal, JournalError
from gateway.model import Reading
from protocols.dlt645 import AddressError, RelayStatus, normalize

log = logging.getLogger("gateway.control")
MAX_REQUEST_ID = 200
PRUNE_EVERY = 3600.0  # s between retention passes over the control tables
RESTART_BACKOFF = (1.0, 60.0)  # s: a crashed lane is restarted after this, doubling


class Control:
    """Prepaid remote control: persisted, guarded, serialized per meter, verified."""

    def __init__(self, config: ControlConfig, journal: Journal, *, station: str, tz: ZoneInfo,
                 meter_for: Callable[[str], MeterConfig | None], bus_for: Callable[[MeterConfig], Bus | None],
                 timing_for: Callable[[MeterConfig], Timing], clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.journal = journal
        self.station = station
        self.tz = tz
        self.meter_for = meter_for
        self.clock = clock
        self.ledger = Ledger(journal, clock)
        self.counters = self.ledger.counters
        self.passwords = Passwords(load_groups(config))  # SecretsError at construction: a config error
        self.quiet = QuietHours(config.window, config.holidays, tz)
        self.rate = TripRate(config.trip_rate_per_min)
        self.hold = frozenset(config.hold_list)
        self.engine = Engine(config, self.ledger, tz=tz, meter_for=meter_for, bus_for=bus_for,
                             timing_for=timing_for, passwords=self.passwords, quiet=self.quiet, rate=self.rate,
                             seen=self._seen)
        self._lanes: dict[str, Lane] = {}
        self._relay: dict[str, RelayStatus] = {}
        self._waiting: dict[str, Command] = {}  # meter -> allow_close verified, waiting for the button
        self._running = False
        self._crashes: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.ledger.watchers.append(self._watch)

    # ---- life cycle ----

    async def start(self) -> None:
        """Create the tables and load every open command (after journal.open())."""
        await self.journal.write(store.create)
        for command in await self.journal.read(store.open_commands):
            self.ledger.open[command.id] = command
            self._lane(command.meter).add(command)
        for command in await self.journal.read(store.waiting_for_customer):
            self._waiting[command.meter] = command
        if self.ledger.open:
            log.info("control: resuming %d open command(s)", len(self.ledger.open))

    async def run(self, stop: asyncio.Event) -> None:
        """Execute commands until `stop` is set; lanes still working then are cancelled (and resumed
        by the next start(): their state is in the journal)."""
        self._running = True
        try:
            for lane in self._lanes.values():
                self._wake(lane)
            while not stop.is_set():
                await self.prune()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), PRUNE_EVERY)
        finally:
            self._running = False
            tasks = [lane.task for lane in self._lanes.values() if lane.task is not None] + list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def prune(self) -> None:
        """Retention: finished commands and their audit trail are kept for the journal's retention_days
        (at least twice max_valid_for, so idempotency outlives every deadline); what goes is counted."""
        keep = max(self.journal.config.retention_days * 86400.0, 2 * self.config.max_valid_for)
        try:
            commands, events = await self.journal.write(store.prune, self.clock() - keep)
        except JournalError as exc:
            log.warning("control: retention pass failed (retrying later): %s", exc)
            return
        self.counters["pruned_commands"] += commands
        self.counters["pruned_events"] += events
        if commands or events:
            log.info("control: retention dropped %d finished command(s) and %d audit event(s) older than %.0f days",
                     commands, events, keep / 86400)

    # ---- commands ----

    async def submit(self, meter: str, action: str | Action, *, request_id: str | None = None,
                     valid_for: float | None = None, reason: str = "", actor: str = "",
                     source: str = "api") -> Command:
        """Commit a command and return it (see the module docs of model.py for its states)."""
        try:
            config, act, valid = self._check(meter, action, valid_for, request_id)
        except ControlError:
            self.counters["rejected"] += 1
            raise
        if request_id:
            known = await self.journal.read(store.by_request_id, request_id)
            if known is not None and known.meter == config.address and known.action is act:
                self.counters["duplicates"] += 1  # answered before any guard could use a rate slot
                return known
        now = self.clock()
        command = Command(id=uuid.uuid4().hex, request_id=request_id or uuid.uuid4().hex, meter=config.address,
                          action=act, state=State.PENDING, created=now, deadline=now + valid, actor=actor,
                          reason=reason, source=source, updated=now, dry_run=self.config.dry_run)
        self._guard(command, now)  # may take a rate slot
        lane = self._lane(command.meter)
        async with lane.lock:
            done = await self.journal.write(store.submit, command)
            if done.existing:
                self.counters["duplicates"] += 1
                return done.command
            self.counters["submitted"] += 1
            self.ledger.record(command)
            for older in done.superseded:
                live = self.ledger.open.get(older.id)
                if live is not None:
                    live.__dict__.update(older.__dict__)
                self.ledger.record(live or older)
        if command.state is State.PENDING:
            if act.group == "relay":
                self._waiting.pop(command.meter, None)
            lane.add(command)
            self._wake(lane)
        return copy.deepcopy(command)  # a snapshot: the lane goes on changing its own

    def _check(self, meter: str, action: str | Action, valid_for: float | None,
               request_id: str | None) -> tuple[MeterConfig, Action, float]:
        """A request's own faults, as the typed errors the API answers with."""
        try:
            address = normalize(str(meter))
        except AddressError as exc:
            raise ControlError(f"bad meter address {meter!r}: {exc}") from None
        config = self.meter_for(address)
        if config is None:
            raise UnknownMeter(f"meter {address} is not configured at station {self.station}")
        try:
            act = Action(action)
        except ValueError:
            raise UnknownAction(f"unknown action {action!r}; one of {', '.join(a.value for a in Action)}") from None
        if config.edition != 2007:
            raise ControlError(f"meter {config.address} speaks DL/T 645-{config.edition}, which has no remote control")
        try:
            valid = self.config.default_valid_for if valid_for is None else float(valid_for)
        except (TypeError, ValueError):
            raise ControlError(f"valid_for must be a number of seconds, got {valid_for!r}") from None
        if not 0 < valid <= self.config.max_valid_for:
            raise ControlError(f"valid_for must be more than 0 and at most {self.config.max_valid_for:g} s, "
                               f"got {valid:g}")
        if request_id is not None and not 0 < len(request_id) <= MAX_REQUEST_ID:
            raise ControlError(f"request_id must be 1..{MAX_REQUEST_ID} characters")
        return config, act, valid

    def _guard(self, command: Command, now: float) -> None:
        """Guards decided at submission: the command starts as failed or dry_run, or stays pending."""
        refusal: tuple[str, str, str] | None = None
        if command.action is Action.TRIP:
            if command.meter in self.hold:
                refusal = ("refused_hold", FailReason.HOLD, "the meter is on the hold list (保电)")
            elif self.config.quiet_mode == "refuse" and self.quiet.quiet(now):
                refusal = ("refused_quiet_hours", FailReason.QUIET_HOURS, self.quiet.why(now))
            elif self.config.rate_mode == "refuse" and not self.config.dry_run and self.rate.take(now):
                refusal = ("refused_rate", FailReason.RATE_LIMITED,
                           f"more than {self.rate.per_min} trips per minute at station {self.station}")
        if refusal is not None:
            counter, command.fail_reason, command.detail = refusal
            command.state = State.FAILED
            self.counters[counter] += 1
        elif self.config.dry_run:
            command.state, command.detail = State.DRY_RUN, "dry run: recorded and guarded, nothing sent"

    async def get(self, command_id: str) -> Command:
        live = self.ledger.open.get(command_id)
        if live is not None:
            return copy.deepcopy(live)
        found = await self.journal.read(store.get, command_id)
        if found is None:
            raise NotFound(f"no command {command_id!r}")
        return found

    async def list(self, meter: str | None = None, limit: int = 100) -> builtins.list[Command]:
        """Newest first."""
        return await self.journal.read(store.list_commands, meter, max(1, min(int(limit), 10000)))

    def changes(self) -> Changes:
        """Every state change from now on: `async with control.changes() as changes: async for c in changes`."""
        return self.ledger.subscribe()

    # ---- what the routine polls see ----

    def observe(self, readings: Sequence[Reading]) -> None:
        """Routine readings: remember status word 3 and notice a customer closing an allowed relay."""
        for reading in readings:
            if reading.quantity == STATUS_NAME and isinstance(reading.value, int):
                self._seen(reading.meter, RelayStatus.from_word(reading.value))

    async def _closed_by_customer(self, command: Command, status: RelayStatus) -> None:
        lane = self._lane(command.meter)
        async with lane.lock:
            if await self.ledger.change(command, None, detail="closed by the customer", relay=status._asdict()):
                self.counters["customer_closures"] += 1
                log.info("control %s: meter %s closed by the customer", command.id, command.meter)

    def _watch(self, command: Command) -> None:
        if (command.action is Action.ALLOW_CLOSE and command.state is State.VERIFIED
                and command.detail == store.WAITING):
            self._waiting[command.meter] = command

    def relay_state(self, meter: str) -> dict[str, bool] | None:
        status = self._relay.get(meter)
        return None if status is None else status._asdict()

    def _seen(self, meter: str, status: RelayStatus) -> None:
        """Status word 3 from a routine poll or from control's own reads."""
        self._relay[meter] = status
        waiting = self._waiting.get(meter)
        if waiting is not None and not status.relay_open:
            del self._waiting[meter]
            self._spawn(self._closed_by_customer(waiting, status))

    # ---- lanes ----

    def _lane(self, meter: str) -> Lane:
        lane = self._lanes.get(meter)
        if lane is None:
            lane = self._lanes[meter] = Lane(meter)
        return lane

    def _wake(self, lane: Lane) -> None:
        lane.wake.set()
        if self._running and (lane.task is None or lane.task.done()):
            lane.task = asyncio.create_task(self._supervise(lane), name=f"control-{lane.meter}")

    async def _supervise(self, lane: Lane) -> None:
        """A lane that crashes is logged, counted and restarted with backoff; its commands stay open."""
        while True:
            try:
                await self.engine.run_lane(lane)
                self._crashes.pop(lane.meter, None)
                return
            except Exception:
                n = self._crashes[lane.meter] = self._crashes.get(lane.meter, 0) + 1
                self.counters["lane_crashes"] += 1
                delay = min(RESTART_BACKOFF[0] * 2 ** (n - 1), RESTART_BACKOFF[1])
                log.exception("control lane of meter %s crashed; restarting in %g s", lane.meter, delay)
                await asyncio.sleep(delay)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except Exception:
                self.counters["lane_crashes"] += 1
                log.exception("control: recording a customer closure failed")
        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
