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
import heapq
import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from gateway.bus_answer import Answer
from gateway.bus_model import BadFrame, BusError, Degraded, LinkIsDown, NoReply, Priority, Timing
from gateway.links.base import Link, LinkDown
from protocols.dlt645 import Accept, Frame, Framer

__all__ = ["BadFrame", "Bus", "BusError", "Degraded", "LinkIsDown", "NoReply", "Priority", "Timing"]

log = logging.getLogger(__name__)


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
        self._answer: Answer | None = None  # that job's reply side
        self._timer: asyncio.TimerHandle | None = None  # one per bus, re-armed, never one per transaction
        self._gap: asyncio.TimerHandle | None = None  # the quiet time before the next request
        self._serving = False  # run() is active
        self._stopped = False  # run() has ended: new jobs fail at once
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
        if self._stopped:  # a bus replaced by a reload: nobody will ever serve it
            raise LinkIsDown(f"bus {self.name} stopped")
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
        self._serving, self._stopped = True, False
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
            self._serving, self._stopped = False, True
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
            self._answer = Answer(self, job.address, job.timing)
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

    def _answered(self, answer: Answer, result: Frame | BusError | LinkDown) -> None:
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
