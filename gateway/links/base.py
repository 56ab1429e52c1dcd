"""What every link shares: up/down state, reconnecting with backoff, and the receive side of a pipe.

A `Reconnecting` thing (a link, a listener) owns its connection inside
`run(stop)`: it connects, reports up, waits until the connection goes away,
reports down and tries again after a capped exponential delay with jitter,
until `stop` is set. Connection problems never escape `run`; anything else
is logged and counted, and the loop goes on. Going down is one WARNING,
coming back one INFO, retries in between are DEBUG.

A `Link` adds the pipe: `send`, `receive` (the next chunk of a byte stream,
or the next message of a message link), `discard_input`. Whatever arrives
while nobody reads waits in a bounded inbox; the oldest is dropped (and
counted) when it is full. A hot reader (the bus, per transaction) can
`attach` a `Receiver` instead: input then goes straight to it from the
transport's callback, with no inbox, event or task in between, and a
connection that goes away or is replaced is reported to it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, Protocol

log = logging.getLogger("gateway.links")

RECONNECT_MIN = 0.5  # s, first delay after a failure
RECONNECT_MAX = 30.0  # s, the cap
STABLE_AFTER = 10.0  # s a connection must have lived for the next failure to start again at the minimum
INBOX_ITEMS = 256  # chunks or messages waiting for a reader
INBOX_BYTES = 65536

StateCallback = Callable[[str, bool, str], None]


class LinkDown(Exception):
    """The link is not connected, or it dropped during the call."""


class Receiver(Protocol):
    """Takes a link's input as it arrives (see `Link.attach`). Called from transport callbacks: never blocks."""

    def data(self, chunk: bytes) -> None:
        """Bytes (byte links) or one message (message links)."""

    def lost(self, reason: str) -> None:
        """The connection this receiver was attached on went away or was replaced."""


def describe(exc: BaseException) -> str:
    """A short human reason for a connection problem."""
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return text


class Backoff:
    """Capped exponential delays with +-20 % jitter, never below `first` nor above `cap`."""

    def __init__(self, first: float = RECONNECT_MIN, cap: float = RECONNECT_MAX) -> None:
        if first <= 0 or cap < first:
            raise ValueError(f"backoff needs 0 < first <= cap, got first={first}, cap={cap}")
        self.first = first
        self.cap = cap
        self.failures = 0
        self._rng = random.Random()  # noqa: S311 - jitter, not secrecy

    def next(self) -> float:
        base = min(self.cap, self.first * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return min(self.cap, max(self.first, base * self._rng.uniform(0.8, 1.2)))

    def reset(self) -> None:
        self.failures = 0


class Reconnecting:
    """Up/down state with logging, counters and a callback, plus the reconnect loop."""

    kind: ClassVar[str] = "link"
    connection_errors: ClassVar[tuple[type[BaseException], ...]] = (OSError, EOFError)

    def __init__(self, name: str, *, reconnect_min: float = RECONNECT_MIN,
                 reconnect_max: float = RECONNECT_MAX) -> None:
        self.name = name
        self.detail = "not connected yet"
        self.stats: Counter[str] = Counter()
        self.on_state: StateCallback | None = None
        self.backoff = Backoff(reconnect_min, reconnect_max)
        self._up = False
        self._up_event = asyncio.Event()
        self._generation = 0  # +1 for every new connection
        self._up_since = 0.0
        self._warned = False  # a WARNING was logged for the current outage

    @property
    def up(self) -> bool:
        return self._up

    async def wait_up(self, timeout: float) -> bool:
        """True as soon as the link is up; False if it is not within `timeout` seconds."""
        if self._up:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._up_event.wait()
        except TimeoutError:
            return self._up
        return True

    # --- state changes (called by subclasses) ---------------------------------------------------
    def _set_up(self, detail: str) -> None:
        """A new connection: up (or, if already up, the old connection was replaced by this one)."""
        replaced = self._up
        self._generation += 1
        self._up = True
        self.detail = detail
        self._up_since = asyncio.get_running_loop().time()
        self.stats["connects"] += 1
        self._up_event.set()
        self._connection_changed(up=True)
        if replaced:
            self.stats["replaced"] += 1
            log.info("%s %s: new connection replaces the old one: %s", self.kind, self.name, detail)
            return
        self._warned = False
        log.info("%s %s up: %s", self.kind, self.name, detail)
        self._notify()

    def _set_down(self, reason: str, *, quiet: bool = False) -> None:
        """The connection is gone. `quiet`: on purpose (stopping), INFO instead of WARNING."""
        self.detail = reason
        if not self._up:
            return
        self._up = False
        self._up_event.clear()
        self._connection_changed(up=False)
        if quiet:
            log.info("%s %s down: %s", self.kind, self.name, reason)
        else:
            self.stats["disconnects"] += 1
            log.warning("%s %s down: %s", self.kind, self.name, reason)
            self._warned = True
        self._notify()

    def _connect_failed(self, reason: str) -> None:
        self.stats["connect_failures"] += 1
        self.detail = reason
        if self._warned:
            log.debug("%s %s: still down: %s", self.kind, self.name, reason)
        else:
            log.warning("%s %s: cannot connect: %s; retrying with backoff", self.kind, self.name, reason)
            self._warned = True

    def _connection_changed(self, *, up: bool) -> None:
        """Hook: a connection came or went (links wake their readers)."""

    def _notify(self) -> None:
        if self.on_state is None:
            return
        try:
            self.on_state(self.name, self._up, self.detail)
        except Exception:  # a broken callback must not take the link down
            self.stats["callback_errors"] += 1
            log.exception("%s %s: on_state callback failed", self.kind, self.name)

    # --- the reconnect loop ------------------------------------------------------------------------
    async def _keep_connected(self, stop: asyncio.Event,
                              session: Callable[[], Coroutine[Any, Any, str]]) -> None:
        """Run `session` (connect, set up, return a reason when the connection ends) until `stop`."""
        loop = asyncio.get_running_loop()
        try:
            while not stop.is_set():
                generation = self._generation
                reason = await self._one_session(stop, session)
                if reason is None or stop.is_set():
                    break
                if self._generation != generation:  # it was connected: a drop
                    self._set_down(reason)
                    if loop.time() - self._up_since >= STABLE_AFTER:
                        self.backoff.reset()
                else:
                    self._connect_failed(reason)
                delay = self.backoff.next()
                log.debug("%s %s: next attempt in %.2f s", self.kind, self.name, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:  # stopped, or the task running us was cancelled
            self._set_down("stopped", quiet=True)

    async def _one_session(self, stop: asyncio.Event,
                           session: Callable[[], Coroutine[Any, Any, str]]) -> str | None:
        """The reason the session ended, or None when it was stopped."""
        task = asyncio.ensure_future(session())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            return None
        exc = task.exception()
        if exc is None:
            return task.result()
        if isinstance(exc, self.connection_errors):
            return describe(exc)
        self.stats["errors"] += 1
        log.error("%s %s: unexpected error; reconnecting", self.kind, self.name, exc_info=exc)
        return f"internal error: {exc!r}"


class Link(Reconnecting):
    """A pipe to meters; see the module docstring. Subclasses implement `run`, and `_write` (with
    `sync_send`) or `_transmit`."""

    message_pipe: ClassVar[bool] = False  # True: receive() returns one message, never joins
    sync_send: ClassVar[bool] = False  # True: send_nowait() works (the transport buffers writes)

    def __init__(self, name: str, *, reconnect_min: float = RECONNECT_MIN, reconnect_max: float = RECONNECT_MAX,
                 inbox_items: int = INBOX_ITEMS, inbox_bytes: int = INBOX_BYTES) -> None:
        super().__init__(name, reconnect_min=reconnect_min, reconnect_max=reconnect_max)
        self._inbox: deque[bytes] = deque()
        self._inbox_size = 0
        self._inbox_items = inbox_items
        self._inbox_bytes = inbox_bytes
        self._wake = asyncio.Event()
        self._receiver: Receiver | None = None

    async def run(self, stop: asyncio.Event) -> None:
        raise NotImplementedError

    def tx_time(self, size: int) -> float:
        """Seconds `size` bytes take to leave on the wire (0 where the link does not pace them)."""
        return 0.0

    async def send(self, data: bytes) -> None:
        if self.sync_send:
            self.send_nowait(data)
            return
        if not self._up:
            raise LinkDown(f"{self.name}: {self.detail}")
        await self._transmit(data)
        self._sent(data)

    def send_nowait(self, data: bytes) -> None:
        """`send` from a callback, for links with `sync_send`: the bus sends the next request from
        the reply's callback, so a busy line costs no task switch per transaction."""
        if not self._up:
            raise LinkDown(f"{self.name}: {self.detail}")
        self._write(data)
        self._sent(data)

    def _sent(self, data: bytes) -> None:
        self.stats["bytes_out"] += len(data)
        self.stats["sends"] += 1

    async def _transmit(self, data: bytes) -> None:
        """Send on a link whose send must be awaited (`sync_send` False)."""
        raise NotImplementedError

    def _write(self, data: bytes) -> None:
        """Hand the bytes to the transport (`sync_send` True)."""
        raise NotImplementedError

    async def receive(self, timeout: float) -> bytes:
        """The next chunk (byte links: all bytes received so far) or message.

        TimeoutError when nothing comes within `timeout`; LinkDown when the link
        is down, or the connection this call started on went away.
        """
        generation = self._generation
        async with asyncio.timeout(timeout):
            while True:
                if self._generation != generation:
                    raise LinkDown(f"{self.name}: the connection changed during receive")
                if self._inbox:
                    return self._take()
                if not self._up:
                    raise LinkDown(f"{self.name}: {self.detail}")
                self._wake.clear()
                await self._wake.wait()

    def discard_input(self) -> int:
        """Drop what was received and not read yet; returns how many bytes."""
        dropped = self._inbox_size
        self._inbox.clear()
        self._inbox_size = 0
        if dropped:
            self.stats["discarded_bytes"] += dropped
        return dropped

    def attach(self, receiver: Receiver) -> None:
        """Hand input to `receiver` until `detach`, starting with what waits in the inbox.

        One receiver at a time (a newer one replaces it); `receive` is not for use meanwhile.
        """
        self._receiver = receiver
        while self._inbox and self._receiver is receiver:
            receiver.data(self._take())

    def detach(self, receiver: Receiver) -> None:
        """Input goes to the inbox again (if `receiver` is still the attached one)."""
        if self._receiver is receiver:
            self._receiver = None

    def _take(self) -> bytes:
        if self.message_pipe or len(self._inbox) == 1:
            data = self._inbox.popleft()
        else:
            data = b"".join(self._inbox)
            self._inbox.clear()
        self._inbox_size -= len(data)
        return data

    def _feed(self, data: bytes) -> None:
        """Bytes (or one message) arrived for the reader."""
        if not data and not self.message_pipe:
            return
        self.stats["bytes_in"] += len(data)
        receiver = self._receiver
        if receiver is not None:
            try:
                receiver.data(data)
            except Exception:  # a broken receiver must not kill the transport's callback
                self.stats["receiver_errors"] += 1
                self._receiver = None
                log.exception("%s %s: receiver failed; detached", self.kind, self.name)
            return
        self._inbox.append(data)
        self._inbox_size += len(data)
        while len(self._inbox) > 1 and (len(self._inbox) > self._inbox_items or self._inbox_size > self._inbox_bytes):
            self._inbox_size -= len(self._inbox.popleft())
            self.stats["overflow"] += 1
        self._wake.set()

    def _connection_changed(self, *, up: bool) -> None:
        if up:  # nothing from an older connection answers what we send on this one
            self._inbox.clear()
            self._inbox_size = 0
        self._wake.set()  # a reader waiting on the old connection gets LinkDown (what came before it first)
        receiver, self._receiver = self._receiver, None
        if receiver is not None:  # it already has every byte of the old connection
            receiver.lost("the connection was replaced" if up else self.detail)
