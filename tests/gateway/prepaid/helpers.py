"""Shared parts of the prepaid tests: a fake control engine (for the policy's unit tests only) and
the policy run as the daemon runs it."""

from __future__ import annotations

import asyncio
import time

from gateway.archive import MeterConfig
from gateway.control.model import Action, Command, State
from gateway.journal import Journal, JournalConfig
from gateway.model import Quality, Reading
from gateway.prepaid import Prepaid, PrepaidConfig
from gateway.prepaid.config import TOTAL

M = "000000000001"
CONFIG = PrepaidConfig(enabled=True, alarm_threshold=20, valid_for=600)


class FakeControl:
    """Records submissions; the same request_id returns the same command, like the real engine."""

    def __init__(self, state: State = State.PENDING) -> None:
        self.state = state  # what a new command starts as (VERIFIED: an engine that is done at once)
        self.commands: dict[str, Command] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.error: Exception | None = None
        self.subscribers: list[asyncio.Queue[Command]] = []

    async def submit(self, meter, action, *, request_id=None, valid_for=None, reason="", actor="", source="api"):
        self.calls.append((meter, str(action), request_id))
        if self.error is not None:
            raise self.error
        if request_id in self.commands:
            return self.commands[request_id]
        now = time.time()
        command = Command(id=f"c{len(self.commands) + 1}", request_id=request_id, meter=meter, action=Action(action),
                          state=self.state, created=now, deadline=now + valid_for, actor=actor, reason=reason,
                          source=source)
        self.commands[request_id] = command
        return command

    async def get(self, command_id):
        return next(c for c in self.commands.values() if c.id == command_id)

    async def changes(self):
        queue: asyncio.Queue[Command] = asyncio.Queue()
        self.subscribers.append(queue)
        while True:
            yield await queue.get()

    def move(self, request_id, state, fail_reason=""):
        command = self.commands[request_id]
        command.state, command.fail_reason = state, fail_reason
        for q in self.subscribers:
            q.put_nowait(command)

    def issued(self):
        return [(m, a) for (m, a, _) in self.calls]


def meters(address):
    return MeterConfig(address=address, link="bus1") if address in {M, "000000000002"} else None


def energy(kwh, t, meter=M, quantity=TOTAL, quality=Quality.GOOD):
    return Reading(meter, quantity, kwh, "kWh", t, t, quality=quality)


async def eventually(check, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.01)


class Daemon:
    """The policy as the daemon runs it: start(), run(stop) in a task, observe() with readings."""

    def __init__(self, path, control, clock=time.time, config=CONFIG):
        self.path, self.control, self.clock, self.config = path, control, clock, config

    async def __aenter__(self):
        self.journal = await Journal(self.path, JournalConfig(commit_interval=0.0)).__aenter__()
        self.prepaid = Prepaid(self.config, self.journal, self.control, station="st-01", meters=meters,
                               clock=self.clock)
        await self.prepaid.start()
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.prepaid.run(self.stop))
        return self.prepaid

    async def __aexit__(self, *exc):
        self.stop.set()
        await self.task
        await self.journal.__aexit__(None, None, None)
