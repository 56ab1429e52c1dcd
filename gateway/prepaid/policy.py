"""The prepaid policy: balances from billing and payments, estimates from readings, and the
alarm / trip / restore commands they call for, submitted to the control engine.

Every decision is persisted (ledger.py) before its command is submitted, under a request_id
derived from the account's transition count (`prepaid:<meter>:<seq>:<action>`), so a restart
re-submits the same keys and the control engine returns the same commands: nothing is issued
twice. Payments and balance updates act at once (the caller awaits the restore being
committed by the engine); readings are batched by `run()` so a round costs one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Protocol

from gateway.archive import MeterConfig
from gateway.control.model import Command, ControlError
from gateway.journal import Journal
from gateway.model import Quality, Reading
from gateway.prepaid import ledger, store
from gateway.prepaid.account import Account, PolicyAction, estimate, view
from gateway.prepaid.config import PrepaidConfig
from gateway.prepaid.money import PrepaidError, UnknownAccount, UnknownMeter, energy_wh, parse_money
from protocols.dlt645 import AddressError, normalize

log = logging.getLogger("meterd.prepaid")
COUNTERS = ("readings", "bad_readings", "register_back", "payments", "duplicate_payments", "updates",
            "duplicate_updates", "stale_updates", "transitions", "submitted", "submit_errors", "rejected", "expired",
            "superseded", "journal_errors", "rejected_messages")
RETRY_MIN, RETRY_MAX = 2.0, 60.0
LOOKUP_LIMIT = 2000  # readings per quantity looked at to find the reference after a balance's as-of time


class Control(Protocol):
    """What the policy needs of gateway.control.service.Control."""

    async def submit(self, meter: str, action: str, *, request_id: str | None = None, valid_for: float | None = None,
                     reason: str = "", actor: str = "", source: str = "api") -> Command: ...

    async def get(self, command_id: str) -> Command: ...

    def changes(self) -> AsyncIterator[Command]: ...


class Prepaid:
    def __init__(self, config: PrepaidConfig, journal: Journal, control: Control, *, station: str = "",
                 meters: Callable[[str], MeterConfig | None] = lambda address: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config, self.journal, self.control = config, journal, control
        self.station, self.meters, self.clock = station, meters, clock
        self.rules = ledger.Rules.of(config)
        self.quantities = frozenset({config.energy_quantity, *config.tariff_quantities})
        self.stats: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._accounts: dict[str, Account] = {}
        self._actions: dict[str, list[PolicyAction]] = {}
        self._by_request: dict[str, PolicyAction] = {}
        self._dirty: dict[str, ledger.Registers] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._wake = asyncio.Event()
        self._retry = RETRY_MIN

    # ---- life cycle ----

    async def start(self) -> None:
        """Create the tables and load accounts and actions (pending ones are submitted by run())."""
        await self.journal.write(store.create)
        for account in await self.journal.read(store.all_accounts):
            self._accounts[account.meter] = account
        for action in await self.journal.read(store.all_actions):
            self._remember(action)

    def observe(self, readings: Iterable[Reading]) -> None:
        """Every journaled reading passes here; energy registers of account meters are kept for run()."""
        woke = False
        for r in readings:
            if r.quantity not in self.quantities or r.meter not in self._accounts:
                continue
            wh = energy_wh(r.value) if r.quality is Quality.GOOD else None
            if wh is None:
                self.stats["bad_readings"] += 1
                continue
            self.stats["readings"] += 1
            regs = self._dirty.setdefault(r.meter, {})
            if r.quantity not in regs or regs[r.quantity][1] <= r.time:
                regs[r.quantity] = (wh, r.time)
                woke = True
        if woke:
            self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Apply readings, submit what is pending (again after a restart), follow command fates."""
        follower = asyncio.create_task(self._follow(), name="prepaid-follow")
        try:
            await self._refresh()
            while not stop.is_set():
                retry = not await self._flush()
                retry = await self._issue_all() or retry
                waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
                await asyncio.wait(waiters, timeout=self._retry if retry else None,
                                   return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
                self._wake.clear()
                self._retry = min(self._retry * 2, RETRY_MAX) if retry else RETRY_MIN
            await self._flush()
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower

    # ---- operations (API, MQTT, CSV) ----

    async def upsert_account(self, address: str, settings: ledger.Settings) -> dict[str, Any]:
        meter = self.check_meter(address)
        return await self._do("settings", meter, ledger.upsert, meter, settings, self.rules, self.clock())

    async def pay(self, address: str, amount: object, payment_id: str, source: str = "api") -> dict[str, Any]:
        meter = self.check_meter(address)
        fen = parse_money(amount, "amount", positive=True)
        if not payment_id or len(payment_id) > 200:
            raise PrepaidError("payment_id is required (1-200 characters): it makes a repeated payment count once")
        payment = ledger.Payment(meter, fen, payment_id, source)
        return await self._do("payments", meter, ledger.pay, payment, self.rules, self.clock())

    async def set_balance(self, address: str, balance: object, update_id: str, as_of: float | None = None,
                          source: str = "api") -> dict[str, Any]:
        meter = self.check_meter(address)
        fen = parse_money(balance, "balance")
        if not update_id or len(update_id) > 200:
            raise PrepaidError("update_id is required (1-200 characters): it makes a repeated update count once")
        now = self.clock()
        when = now if as_of is None else as_of
        if when > now + 300:
            raise PrepaidError(f"as_of {when} is in the future")
        found = await self._first_registers(meter, when, now)
        change = ledger.Update(meter, fen, when, update_id, found, source)
        return await self._do("updates", meter, ledger.update, change, self.rules, now)

    def accounts(self) -> list[dict[str, Any]]:
        return [self._view(a) for _, a in sorted(self._accounts.items())]

    def account(self, address: str) -> dict[str, Any]:
        meter = self._address(address)
        if meter not in self._accounts:
            raise UnknownAccount(f"meter {meter} has no prepaid account")
        return self._view(self._accounts[meter])

    def status(self) -> dict[str, Any]:
        """For /api/v1/status: counters and how many accounts are in each state."""
        states: dict[str, int] = {}
        for a in self._accounts.values():
            states[str(a.state)] = states.get(str(a.state), 0) + 1
        pending = sum(a.open for acts in self._actions.values() for a in acts)
        return {"accounts": len(self._accounts), "states": states, "open_actions": pending, **self.stats}

    # ---- internals ----

    def _address(self, address: str) -> str:
        try:
            meter = normalize(address)
        except AddressError as exc:
            raise PrepaidError(f"bad address: {exc}") from None
        if not meter.isdigit():
            raise PrepaidError(f"bad address {address!r}: an account is for one meter (no wildcards)")
        return meter

    def check_meter(self, address: str) -> str:
        """The normalized address of a meter that has an account or is in the archive; PrepaidError if not."""
        meter = self._address(address)
        if meter not in self._accounts and self.meters(meter) is None:
            raise UnknownMeter(f"unknown meter {meter}: not in this station's meter archive")
        return meter

    def _view(self, a: Account) -> dict[str, Any]:
        est = estimate(a, self.rules.total, self.rules.tariffs)
        return view(a, est, a.thresholds(self.rules.defaults), self._actions.get(a.meter, []), self.config.currency)

    async def _do(self, kind: str, meter: str, fn: Callable[..., ledger.Result], *args: Any) -> dict[str, Any]:
        """Run one ledger operation, then submit what it decided at once (a restore must not wait)."""
        result: ledger.Result = await self.journal.write(fn, *args)
        self._apply(result)
        if kind != "settings":
            self.stats[kind if result.outcome == "applied" else f"{result.outcome}_{kind}"] += 1
        submitted = await self._issue(meter)
        return {"outcome": result.outcome, "account": self._view(self._accounts[meter]),
                "actions": [a.public() for a in submitted]}

    async def _first_registers(self, meter: str, since: float, until: float) -> ledger.Registers:
        """The oldest register readings at or after `since` already in the journal."""
        found: ledger.Registers = {}
        for quantity in sorted(self.quantities):
            rows = await self.journal.query(meter=meter, since=since, until=until, quantity=quantity,
                                            limit=LOOKUP_LIMIT)
            for r in rows:
                wh = energy_wh(r.value) if r.quality is Quality.GOOD else None
                if wh is not None:
                    found[quantity] = (wh, r.time)
                    break
        return found

    def _apply(self, result: ledger.Result) -> None:
        a = result.account
        known = self._accounts.get(a.meter)
        if known is None or known.rev <= a.rev:
            self._accounts[a.meter] = a
        for request_id in result.superseded:
            if (old := self._by_request.get(request_id)) is not None and old.status == "pending":
                old.status, old.detail = "superseded", "superseded before it was submitted"
                self.stats["superseded"] += 1
        for action in result.actions:
            self._remember(action)
        self.stats["transitions"] += bool(result.actions)
        self.stats["register_back"] += result.register_back
        if result.register_back:
            log.warning("meter %s: an energy register went back; the estimate restarts from it", a.meter)

    def _remember(self, action: PolicyAction) -> None:
        """Keep an action in memory; like the table, only the newest finished ones per meter (bounded)."""
        if action.request_id in self._by_request:
            return
        self._by_request[action.request_id] = action
        actions = self._actions.setdefault(action.meter, [])
        actions.append(action)
        while len(actions) > store.KEEP_ACTIONS and not actions[0].open:
            del self._by_request[actions.pop(0).request_id]

    async def _flush(self) -> bool:
        """Apply the readings observed so far; False if they could not be stored (kept for a retry)."""
        batch, self._dirty = self._dirty, {}
        if not batch:
            return True
        try:
            results = await self.journal.write(ledger.registers, batch, self.rules, self.clock())
        except Exception as exc:  # keep the readings for the next pass; newer ones that came meanwhile win
            self.stats["journal_errors"] += 1
            log.error("prepaid: could not store %d meters' registers, retrying: %s", len(batch), exc)
            for meter, regs in batch.items():
                newer = self._dirty.setdefault(meter, {})
                for q, reg in regs.items():
                    if q not in newer or newer[q][1] < reg[1]:
                        newer[q] = reg
            return False
        for result in results:
            self._apply(result)
        await asyncio.gather(*(self._issue(r.account.meter) for r in results if r.actions))
        return True

    async def _issue_all(self) -> bool:
        """Submit every pending action; True if some could not be submitted (try again later)."""
        meters = [m for m, acts in self._actions.items() if any(a.status == "pending" for a in acts)]
        await asyncio.gather(*(self._issue(m) for m in meters))
        return any(a.status == "pending" for m in meters for a in self._actions[m])

    async def _issue(self, meter: str) -> list[PolicyAction]:
        """Submit this meter's pending actions in decision order, one meter at a time."""
        done: list[PolicyAction] = []
        async with self._locks.setdefault(meter, asyncio.Lock()):
            for action in [a for a in self._actions.get(meter, []) if a.status == "pending"]:
                if action.status != "pending":  # superseded while we awaited the previous one
                    continue
                if not await self._submit(action):
                    break  # keep the order: a later action must not overtake one that failed to go out
                done.append(action)
        return done

    async def _submit(self, action: PolicyAction) -> bool:
        left = action.deadline - self.clock()
        if left <= 0:
            action.status, action.detail = "expired", "its validity passed before it could be submitted"
            self.stats["expired"] += 1
        else:
            try:
                command = await self.control.submit(
                    action.meter, action.action, request_id=action.request_id, valid_for=left,
                    reason=f"prepaid: {action.reason}", actor="prepaid", source="prepaid")
            except ControlError as exc:
                action.status, action.result, action.detail = "rejected", "rejected", str(exc)
                self.stats["rejected"] += 1
                log.warning("prepaid: %s for meter %s was refused: %s", action.action, action.meter, exc)
            except Exception as exc:  # the engine or its journal is unavailable: retried by run()
                self.stats["submit_errors"] += 1
                log.error("prepaid: could not submit %s for meter %s, will retry: %s", action.action,
                          action.meter, exc)
                return False
            else:
                action.status, action.command_id = "submitted", command.id
                if not action.result:
                    self._result(action, command)
                self.stats["submitted"] += 1
        await self._persist(action)
        return True

    @staticmethod
    def _result(action: PolicyAction, command: Command) -> None:
        reason = f" ({command.fail_reason})" if command.fail_reason else ""
        action.result, action.detail = f"{command.state}{reason}", command.detail

    async def _persist(self, action: PolicyAction) -> None:
        try:
            await self.journal.write(ledger.record_action, action)
        except Exception as exc:  # the record is also in memory; a restart re-submits under the same key
            self.stats["journal_errors"] += 1
            log.error("prepaid: could not record the fate of %s: %s", action.request_id, exc)

    async def _refresh(self) -> None:
        """After a restart: the fate of commands submitted before it (they moved while we were down)."""
        for action in [a for acts in self._actions.values() for a in acts if a.open and a.command_id]:
            try:
                self._result(action, await self.control.get(action.command_id or ""))
            except Exception as exc:  # shown as it was; the change stream updates it later
                log.warning("prepaid: could not look up command %s: %s", action.command_id, exc)
                continue
            await self._persist(action)

    async def _follow(self) -> None:
        """Keep each action's result in step with its command (shown as the account's last action)."""
        delay = RETRY_MIN
        while True:
            changes = self.control.changes()
            try:
                async for command in changes:
                    action = self._by_request.get(command.request_id)
                    if action is not None:
                        action.command_id = command.id
                        self._result(action, command)
                        await self._persist(action)
                    delay = RETRY_MIN
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # resubscribe with backoff
                log.error("prepaid: the control change stream failed, resubscribing in %gs: %s", delay, exc)
            finally:
                close = getattr(changes, "close", None)  # unsubscribe (gateway.control's Changes)
                if callable(close):
                    close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
