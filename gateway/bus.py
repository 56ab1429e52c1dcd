"""One bus per link: the only thing that talks on it.

Everything that wants a meter on this link queues a `Job` here. Jobs run one
at a time (one outstanding request on a half-duplex line), control ahead of
re-reads ahead of routine polls, with the first-byte and inter-byte timeouts,
the gap between frames, retries, and local echo dropped by the framer. A
meter that keeps failing is degraded: its routine jobs are refused until a
probe time that backs off, so a dead meter cannot eat the bus; it recovers
by itself on the first success.

The bus is driven by callbacks: the reply's callback (or the bus timer, or
the end of the gap) settles the job and sends the next request at once, so a
busy line costs one task switch per transaction, the caller's. The bus's own
task (`run`) only does what has to wait: a link that is down (its grace
period) and links whose send must be awaited (MQTT).
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

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
    attempts: int = 0  # made so far


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
        self._heap: list[tuple[int, int, _Job]] = []
        self._seq = itertools.count()
        self._framer = Framer(Accept.REPLIES)
        self.busy_since: float | None = None
        self.link_grace = link_grace  # s a reconnecting link gets before queued jobs fail with link_down
        self._down_since: float | None = None
        self._job: _Job | None = None  # on the line: sent (or going out), waiting for its answer
        self._answer: _Answer | None = None  # that job's reply side
        self._timer: asyncio.TimerHandle | None = None  # one per bus, re-armed, never one per transaction
        self._gap: asyncio.TimerHandle | None = None  # the quiet time before the next request
        self._serving = False  # run() is active
        self._stalled = False  # the next job waits for the link: run() handles it
        self._outgoing: tuple[_Job, bytes] | None = None  # for run() to send (a link without sync_send)
        self._wakeup: asyncio.Future[None] | None = None  # run() waits on it
        # The loop the bus runs on, kept: asyncio.get_running_loop() is a getpid() system call on
        # CPython 3.11, and the hot path would make several per transaction.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: tuple[_Job | None, Frame | BusError | None] = (None, None)  # a result waiting for its gap

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
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
        job = _Job(int(priority), next(self._seq), request, address, timing or self.timing, broadcast,
                   loop.create_future())
        if health and health.failures >= self.degrade_after:
            health.probe_at = now + health.backoff  # only one probe in flight per interval
        heapq.heappush(self._heap, (job.priority, job.seq, job))
        if self._job is None and self._gap is None and self._serving and not self._stalled:
            self._next()
        return await job.future

    async def run(self, stop: asyncio.Event) -> None:
        """Serve jobs until stop is set; jobs still queued then fail with LinkIsDown."""
        loop = self._loop = asyncio.get_running_loop()
        stopping = asyncio.ensure_future(stop.wait())
        self._serving = True
        try:
            self._next()  # whatever was queued before the bus started
            while not stop.is_set():
                if self._outgoing is None and not self._stalled:
                    self._wakeup = loop.create_future()
                    waiters: set[asyncio.Future[Any]] = {self._wakeup, stopping}
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                    self._wakeup = None
                    continue
                if self._outgoing is not None:
                    job, data = self._outgoing
                    self._outgoing = None
                    try:
                        await self.link.send(data)
                    except LinkDown as exc:
                        if self._job is job:
                            self._settle(job, LinkIsDown(f"link {self.name} dropped: {exc}"))
                        continue
                    if self._job is job:
                        self._sent(job)
                else:
                    await self._wait_link()
                    self._stalled = False
                    self._next()
        finally:
            self._serving = False
            stopping.cancel()
            for handle in (self._timer, self._gap):
                if handle is not None:
                    handle.cancel()
            self._timer = self._gap = None
            self._deliver()  # a job that finished and waited for its gap has its result
            if self._answer is not None:
                self.link.detach(self._answer)
                self._answer = None
            stopped = LinkIsDown(f"bus {self.name} stopped")
            jobs = [self._job] if self._job is not None else []
            self._job, self._outgoing = None, None
            while self._heap:
                jobs.append(heapq.heappop(self._heap)[2])
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(stopped)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _kick(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _wait_link(self) -> None:
        """A link that just dropped gets `link_grace` to come back before queued jobs fail."""
        left = self.link_grace - (time.monotonic() - (self._down_since or time.monotonic()))
        if left > 0 and await self.link.wait_up(left):
            self._down_since = None

    def _next(self) -> None:
        """Start the next job, if the line is free. Called from callbacks: never raises, never waits."""
        self._gap = None
        while self._job is None and self._heap and not self._stalled:
            job = heapq.heappop(self._heap)[2]
            if job.future.done():  # the caller gave up (cancelled)
                continue
            if not self.link.up:
                now = time.monotonic()
                if self._down_since is None:
                    self._down_since = now
                if now - self._down_since < self.link_grace:  # run() waits for the link to come back
                    heapq.heappush(self._heap, (job.priority, job.seq, job))
                    self._stalled = True
                    self._kick()
                    return
                # down for longer: fail at once (a round over a dead link stays quick)
                job.future.set_exception(LinkIsDown(f"link {self.name} is down: {self.link.detail}"))
                continue
            self._down_since = None
            self._start(job)

    def _start(self, job: _Job) -> None:
        link = self.link
        if job.attempts:
            self.stats["retries"] += 1
        job.attempts += 1
        self._job = job
        link.discard_input()
        self._framer.reset()
        data = b"\xfe" * job.timing.preamble + job.request
        if self.trace:
            self.trace.debug("%s -> %s", self.name, data.hex(" "))
        self.stats["requests"] += 1
        self.busy_since = time.monotonic()
        if not job.broadcast:
            self._answer = _Answer(self, job.address, job.timing)
            link.attach(self._answer)  # before sending: a reply may come while send() still waits (MQTT PUBACK)
        if not link.sync_send:
            self._outgoing = (job, data)
            self._kick()
            return
        try:
            link.send_nowait(data)
        except Exception as exc:  # a callback must settle the job whatever the transport did
            self._settle(job, LinkIsDown(f"link {self.name} dropped: {exc}"))
            return
        self._sent(job)

    def _sent(self, job: _Job) -> None:
        if job.broadcast:
            self._settle(job, None)
        elif self._answer is not None:
            self._answer.start()

    def _answered(self, answer: _Answer, result: Frame | BusError | LinkDown) -> None:
        """From the answer: a frame, a timeout (NoReply/BadFrame) or the connection lost."""
        if answer is not self._answer or self._job is None:
            return
        job = self._job
        if isinstance(result, LinkDown):
            self._settle(job, LinkIsDown(f"link {self.name} dropped: {result}"))
        elif isinstance(result, BusError) and job.attempts <= max(0, job.timing.retries):
            self._release()
            heapq.heappush(self._heap, (job.priority, job.seq, job))  # again, ahead of its peers
            self._after_gap(job.timing)
        else:
            self._settle(job, result)

    def _release(self) -> None:
        answer, self._answer, self._job, self.busy_since = self._answer, None, None, None
        if answer is not None:
            self.link.detach(answer)

    def _settle(self, job: _Job, result: Frame | BusError | None) -> None:
        """The job is over; its caller hears so after the gap, when the line is free again (as a
        broadcast's meters have had their quiet time to act on it), and the next job starts then."""
        self._release()
        if not isinstance(result, BusError):
            self._record(job.address, ok=True)
        elif not isinstance(result, LinkIsDown):  # a link outage says nothing about the meter
            self._record(job.address, ok=False)
        self._after_gap(job.timing, job, result)

    def _after_gap(self, timing: Timing, job: _Job | None = None, result: Frame | BusError | None = None) -> None:
        self._done = (job, result)
        if timing.gap > 0 and self._serving:
            self._gap = self._running_loop().call_later(timing.gap, self._deliver)
        else:
            self._deliver()

    def _deliver(self) -> None:
        job, result = self._done
        self._done = (None, None)
        if job is not None and not job.future.done():
            if isinstance(result, BusError):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
        if self._serving:
            self._next()

    def _record(self, address: str, *, ok: bool) -> None:
        if ok:
            self.health.pop(address, None)
            return
        health = self.health.setdefault(address, _Health())
        health.failures += 1
        if health.failures >= self.degrade_after:
            health.backoff = min(self.probe_max, max(self.probe_min, health.backoff * 2))
            health.probe_at = time.monotonic() + health.backoff

    def _arm(self, deadline: float) -> None:
        """Make the bus timer fire by `deadline`. It is left running when a transaction ends: a
        later deadline keeps it, and when it fires early it re-arms itself for the current one."""
        timer = self._timer
        if timer is not None:
            if timer.when() <= deadline:
                return
            timer.cancel()
        self._timer = self._running_loop().call_at(deadline, self._tick)

    def _tick(self) -> None:
        self._timer = None
        answer = self._answer
        if answer is not None and answer.deadline and not answer.done:  # started and waiting
            answer.expire()


class _Answer:
    """The reply side of one transaction, fed by the link as bytes arrive (a `links.Receiver`).

    No task and no wait_for per transaction: the framer runs in the transport's callback and
    hands the bus the whole frame from the address. The bus timer does both timeouts (`Bus._arm`):
    the first-byte deadline, then the inter-byte one that each chunk moves; when the line was quiet
    until the deadline, the framer is flushed and the answer is NoReply or BadFrame.
    """

    __slots__ = ("address", "bus", "deadline", "done", "errors", "loop", "received", "timing", "wildcard")

    def __init__(self, bus: Bus, address: str, timing: Timing) -> None:
        self.bus = bus
        self.address = address
        self.wildcard = "A" in address
        self.timing = timing
        self.loop = bus._running_loop()
        self.done = False
        self.received = 0
        self.errors: list[FrameError] = []
        self.deadline = 0.0  # 0: not started (the request is still going out)

    def _finish(self, result: Frame | BusError | LinkDown) -> None:
        self.done = True
        self.bus._answered(self, result)

    def start(self) -> None:
        """The request is out: the first-byte timeout runs from now (inter-byte if bytes came already)."""
        if not self.done:
            self.deadline = self.loop.time() + (self.timing.inter_byte if self.received else self.timing.first_byte)
            self.bus._arm(self.deadline)

    def data(self, chunk: bytes) -> None:
        if self.done or not chunk:
            return
        bus = self.bus
        self.received += len(chunk)
        if bus.trace:
            bus.trace.debug("%s <- %s", bus.name, chunk.hex(" "))
        for event in bus._framer.feed(chunk):
            if isinstance(event, Frame):
                if event.address == self.address or self.wildcard:
                    self._finish(event)
                    return
                bus.stats["stray_frames"] += 1  # a late reply to an earlier request
            else:
                self.errors.append(event)
        if self.deadline:  # started: the line must not go quiet for longer than the inter-byte timeout now
            self.deadline = self.loop.time() + self.timing.inter_byte
            self.bus._arm(self.deadline)

    def lost(self, reason: str) -> None:
        if not self.done:
            self._finish(LinkDown(f"{self.bus.name}: {reason}"))

    def expire(self) -> None:
        """The bus timer fired: a timeout if the deadline has passed, else wait on."""
        if self.loop.time() < self.deadline:  # an earlier transaction's deadline, or bytes came since
            self.bus._arm(self.deadline)
            return
        bus = self.bus
        for event in bus._framer.flush():  # the line went quiet: a held-back frame may still be whole
            if isinstance(event, Frame):
                if event.address == self.address or self.wildcard:
                    self._finish(event)
                    return
                bus.stats["stray_frames"] += 1
            else:
                self.errors.append(event)
        if self.received == 0:
            bus.stats["no_reply"] += 1
            self._finish(NoReply(f"no reply from {self.address} within {self.timing.first_byte:g} s"))
            return
        bus.stats["bad_frames"] += 1
        detail = "; ".join(f"{e.reason}: {e}" for e in self.errors[:3]) or "no valid frame"
        self._finish(BadFrame(f"{self.received} bytes from {self.address} but no valid reply ({detail})"))
