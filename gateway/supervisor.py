"""Every background task of the daemon runs under supervision.

A task that crashes is logged with its traceback, counted and restarted
with capped backoff; it is never silently lost and never takes the daemon
down. A task that returns normally is done (stop was requested).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, stop: asyncio.Event, *, backoff_min: float = 1.0, backoff_max: float = 60.0) -> None:
        self.stop = stop
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.crashes: Counter[str] = Counter()
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def spawn(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        self.tasks[name] = asyncio.create_task(self._keep(name, factory), name=name)

    async def _keep(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        delay = self.backoff_min
        while not self.stop.is_set():
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                self.crashes[name] += 1
                log.exception("task %s crashed (%d so far); restarting in %.0f s", name, self.crashes[name], delay)
            try:
                await asyncio.wait_for(self.stop.wait(), delay * random.uniform(0.8, 1.2))  # noqa: S311
                return
            except TimeoutError:
                delay = min(self.backoff_max, delay * 2)

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop was set: give tasks `timeout` to finish, then cancel what is left."""
        tasks = list(self.tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
