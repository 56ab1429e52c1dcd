"""One bus per link: the only task that talks on it.

Everything that wants a meter on this link queues a `Job` here. Jobs run one
at a time (one outstanding request on a half-duplex line), control ahead of
re-reads ahead of routine polls, with the first-byte and inter-byte timeouts,
the gap between frames, retries, and local echo dropped by the framer. A
meter that keeps failing is degraded: its routine jobs are refused until a
probe time that backs off, so a dead meter cannot eat the bus; it recovers
by itself on the first success.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass

from gateway.links.base import Link, LinkDown
from protocols.dlt645 import Accept, Frame, FrameError, Framer

log = logging.getLogger(__name__)


class Priority(enum.IntEnum):
    CONTROL = 0
    REREAD = 1
    ROUTINE = 2
    BACKGROUND = 3  # housekeeping (clock checks): only when no poll is waiting


@dataclass(frozen=True)
class Timing:
    """Per-link defaults, overridable per meter (DTUs need seconds, not milliseconds)."""

    first_byte: float = 1.0
    inter_byte: float = 0.1
    gap: float = 0.02
    retries: int = 1
    preamble: int = 4


class BusError(Exception):
    """A transaction that did not produce a reply frame; `reason` is a `model.Reason` value."""

    reason = "no_reply"


class NoReply(BusError):
    reason = "no_reply"


class BadFrame(BusError):
    reason = "bad_frame"


class Degraded(BusError):
    reason = "degraded"


class LinkIsDown(BusError):
    reason = "link_down"


@dataclass
class _Health:
    failures: int = 0
    probe_at: float = 0.0
    backoff: float = 0.0


@dataclass(slots=True)
class _Job:
    priority: int
    seq: int
    request: bytes
    address: str
    timing: Timing
    broadcast: bool
    future: asyncio.Future[Frame | None]


class Bus:
    def __init__(self, link: Link, timing: Timing | None = None, *, degrade_after: int = 3,
                 probe_min: float = 60.0, probe_max: float = 3600.0, trace: logging.Logger | None = None,
                 link_grace: float = 3.0) -> None:
        self.link = link
        self.timing = timing or Timing()
        self.degrade_after = degrade_after
        self.probe_min = probe_min
        self.probe_max = probe_max
        self.trace = trace
        self.stats: Counter[str] = Counter()
        self.health: dict[str, _Health] = {}
        # (priority, seq, job): tuples compare in C; a dataclass with order=True compared in Python
        self._queue: asyncio.PriorityQueue[tuple[int, int, _Job]] = asyncio.PriorityQueue()
        self._seq = itertools.count()
        self._framer = Framer(Accept.REPLIES)
        self.busy_since: float | None = None
        self.link_grace = link_grace  # s a reconnecting link gets before queued jobs fail with link_down
        self._down_since: float | None = None
        self._answer: _Answer | None = None  # the transaction waiting for its reply
        self._timer: asyncio.TimerHandle | None = None  # one per bus, re-armed, never one per transaction

    @property
    def name(self) -> str:
        return self.link.name

    def degraded(self) -> list[str]:
        return [a for a, h in self.health.items() if h.failures >= self.degrade_after]

    async def transact(self, request: bytes, address: str, *, priority: Priority = Priority.ROUTINE,
                       timing: Timing | None = None, broadcast: bool = False) -> Frame | None:
        """Queue one request for `address`; the reply frame from that address (None for a broadcast).

        Raises NoReply, BadFrame, LinkIsDown or Degraded (routine/re-read jobs of a degraded meter).
        """
        health = self.health.get(address)
        now = time.monotonic()
        if (health and health.failures >= self.degrade_after and priority is not Priority.CONTROL
                and now < health.probe_at):
            self.stats["degraded_skips"] += 1
            raise Degraded(f"{address} is degraded after {health.failures} failures; next probe in "
                           f"{health.probe_at - now:.0f} s")
        loop = asyncio.get_running_loop()
        job = _Job(int(priority), next(self._seq), request, address, timing or self.timing, broadcast,
                   loop.create_future())
        if health and health.failures >= self.degrade_after:
            health.probe_at = now + health.backoff  # only one probe in flight per interval
        self._queue.put_nowait((job.priority, job.seq, job))
        return await job.future

    async def run(self, stop: asyncio.Event) -> None:
        """Serve jobs until stop is set; jobs still queued then fail with LinkIsDown."""
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                if self._queue.empty():  # only an idle bus pays for a waiter task
                    getter = asyncio.create_task(self._queue.get())
                    done, _ = await asyncio.wait({getter, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    if getter not in done:
                        getter.cancel()
                        break
                    job = getter.result()[2]
                else:
                    job = self._queue.get_nowait()[2]
                if job.future.done():  # the caller gave up (cancelled)
                    continue
                try:
                    result = await self._run_job(job)
                except BusError as exc:
                    if not isinstance(exc, LinkIsDown):  # a link outage says nothing about the meter
                        self._record(job.address, ok=False)
                    if not job.future.done():
                        job.future.set_exception(exc)
                else:
                    self._record(job.address, ok=True)
                    if not job.future.done():
                        job.future.set_result(result)
        finally:
            stopping.cancel()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            while not self._queue.empty():
                job = self._queue.get_nowait()[2]
                if not job.future.done():
                    job.future.set_exception(LinkIsDown(f"bus {self.name} stopped"))

    async def _wait_link(self) -> bool:
        """A link that just dropped gets `link_grace` to come back before queued jobs fail;
        one that has been down longer fails them at once (a round over a dead link stays quick)."""
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        left = self.link_grace - (now - self._down_since)
        if left > 0 and await self.link.wait_up(left):
            self._down_since = None
            return True
        return False

    def _record(self, address: str, *, ok: bool) -> None:
        if ok:
            self.health.pop(address, None)
            return
        health = self.health.setdefault(address, _Health())
        health.failures += 1
        if health.failures >= self.degrade_after:
            health.backoff = min(self.probe_max, max(self.probe_min, health.backoff * 2))
            health.probe_at = time.monotonic() + health.backoff

    async def _run_job(self, job: _Job) -> Frame | None:
        timing = job.timing
        attempts = 1 + max(0, timing.retries) if not job.broadcast else 1
        error: BusError = NoReply("no attempt")
        for attempt in range(attempts):
            if not self.link.up and not await self._wait_link():
                raise LinkIsDown(f"link {self.name} is down: {self.link.detail}")
            if attempt:
                self.stats["retries"] += 1
            self._down_since = None
            try:
                frame = await self._exchange(job, timing)
            except LinkDown as exc:
                raise LinkIsDown(f"link {self.name} dropped: {exc}") from exc
            except BusError as exc:
                error = exc
                continue
            finally:
                if timing.gap:
                    await asyncio.sleep(timing.gap)
            return frame
        raise error

    async def _exchange(self, job: _Job, timing: Timing) -> Frame | None:
        link = self.link
        link.discard_input()
        self._framer.reset()
        data = b"\xfe" * timing.preamble + job.request
        if self.trace:
            self.trace.debug("%s -> %s", self.name, data.hex(" "))
        self.stats["requests"] += 1
        self.busy_since = time.monotonic()
        answer = None if job.broadcast else _Answer(self, job.address, timing)
        try:
            if answer is None:
                await link.send(data)
                return None
            self._answer = answer
            link.attach(answer)  # before sending: a reply may come while send() still waits (MQTT PUBACK)
            await link.send(data)
            answer.start()
            return await answer.future
        finally:
            self.busy_since = None
            if answer is not None:
                self._answer = None
                link.detach(answer)
                answer.close()

    def _arm(self, deadline: float) -> None:
        """Make the bus timer fire by `deadline`. It is left running when a transaction ends: a
        later deadline keeps it, and when it fires early it re-arms itself for the current one."""
        timer = self._timer
        if timer is not None:
            if timer.when() <= deadline:
                return
            timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(deadline, self._tick)

    def _tick(self) -> None:
        self._timer = None
        answer = self._answer
        if answer is not None and answer.deadline and not answer.future.done():  # started and waiting
            answer.expire()


class _Answer:
    """The reply side of one transaction, fed by the link as bytes arrive (a `links.Receiver`).

    No task and no wait_for per transaction: the framer runs in the transport's callback and
    resolves `future` when a whole frame from the address arrives. The bus timer does both timeouts
    (`Bus._arm`): the first-byte deadline, then the inter-byte one that each chunk moves; when the
    line was quiet until the deadline, the framer is flushed and the answer is NoReply or BadFrame.
    """

    __slots__ = ("address", "bus", "deadline", "errors", "future", "loop", "received", "timing", "wildcard")

    def __init__(self, bus: Bus, address: str, timing: Timing) -> None:
        self.bus = bus
        self.address = address
        self.wildcard = "A" in address
        self.timing = timing
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future[Frame] = self.loop.create_future()
        self.received = 0
        self.errors: list[FrameError] = []
        self.deadline = 0.0  # 0: not started (the request is still going out)

    def start(self) -> None:
        """The request is out: the first-byte timeout runs from now (inter-byte if bytes came already)."""
        if not self.future.done():
            self.deadline = self.loop.time() + (self.timing.inter_byte if self.received else self.timing.first_byte)
            self.bus._arm(self.deadline)

    def close(self) -> None:
        future = self.future
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()  # retrieved: a LinkDown that raced send()'s own is not "never retrieved"

    def data(self, chunk: bytes) -> None:
        if self.future.done() or not chunk:
            return
        bus = self.bus
        self.received += len(chunk)
        if bus.trace:
            bus.trace.debug("%s <- %s", bus.name, chunk.hex(" "))
        for event in bus._framer.feed(chunk):
            if isinstance(event, Frame):
                if event.address == self.address or self.wildcard:
                    self.future.set_result(event)
                    return
                bus.stats["stray_frames"] += 1  # a late reply to an earlier request
            else:
                self.errors.append(event)
        if self.deadline:  # started: the line must not go quiet for longer than the inter-byte timeout now
            self.deadline = self.loop.time() + self.timing.inter_byte
            self.bus._arm(self.deadline)

    def lost(self, reason: str) -> None:
        if not self.future.done():
            self.future.set_exception(LinkDown(f"{self.bus.name}: {reason}"))

    def expire(self) -> None:
        """The bus timer fired: a timeout if the deadline has passed, else wait on."""
        if self.loop.time() < self.deadline:  # an earlier transaction's deadline, or bytes came since
            self.bus._arm(self.deadline)
            return
        bus = self.bus
        for event in bus._framer.flush():  # the line went quiet: a held-back frame may still be whole
            if isinstance(event, Frame):
                if event.address == self.address or self.wildcard:
                    self.future.set_result(event)
                    return
                bus.stats["stray_frames"] += 1
            else:
                self.errors.append(event)
        if self.received == 0:
            bus.stats["no_reply"] += 1
            self.future.set_exception(NoReply(f"no reply from {self.address} within {self.timing.first_byte:g} s"))
            return
        bus.stats["bad_frames"] += 1
        detail = "; ".join(f"{e.reason}: {e}" for e in self.errors[:3]) or "no valid frame"
        self.future.set_exception(BadFrame(f"{self.received} bytes from {self.address} but no valid reply ({detail})"))
