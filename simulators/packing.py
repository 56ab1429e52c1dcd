"""Packing a bus's timed reply chunks into network packets, and reconnect backoff.

Shared by the transports that carry frames in packets (a 4G DTU's TCP link,
MQTT messages) rather than as a byte stream.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from protocols.dlt645 import Accept, BadChecksum, BadEnd, Frame, Framer
from simulators.bus import CHUNK, Bus

QUIET_MIN = 0.05  # s of silence after which a DTU sends what it has packed
MAX_PACKET = 1024  # bytes; a DTU's packing length


class Packer:
    """Collects what a bus writes and hands out packets: a whole frame at once, leftovers after quiet time.

    `emit` gets each packet. `idle` is set while nothing is held back, so
    other packets (heartbeats) never land inside a reply.
    """

    def __init__(self, bus: Bus, emit: Callable[[bytes], None]) -> None:
        self._bus = bus
        self._emit = emit
        self._buf = bytearray()
        self._framer = Framer(Accept.ALL)
        self._timer: asyncio.TimerHandle | None = None
        self.idle = asyncio.Event()
        self.idle.set()

    def quiet(self) -> float:
        """Silence that ends a packet: longer than the bus's pause between two chunks of one reply."""
        return QUIET_MIN + 2 * CHUNK * self._bus.wire.byte_time()

    def write(self, data: bytes) -> None:
        self._buf += data
        self.idle.clear()
        events = self._framer.feed(data)
        whole = any(isinstance(e, Frame | BadChecksum | BadEnd) for e in events)
        if (whole and self._framer.pending == 0) or len(self._buf) >= MAX_PACKET:
            self.flush()
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.quiet(), self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._framer.reset()
        data, self._buf = bytes(self._buf), bytearray()
        self.idle.set()
        if data:
            self._emit(data)

    def close(self) -> None:
        """Forget what is held back (the connection is gone)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._buf.clear()
        self._framer.reset()
        self.idle.set()


class Backoff:
    """Capped exponential delays with +-20 % jitter, never below `first` nor above `cap`."""

    def __init__(self, first: float, cap: float, rng: random.Random | None = None) -> None:
        if first <= 0 or cap < first:
            raise ValueError(f"backoff needs 0 < first <= cap, got first={first}, cap={cap}")
        self.first = first
        self.cap = cap
        self.rng = rng or random.Random()
        self.failures = 0

    def next(self) -> float:
        base = min(self.cap, self.first * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return min(self.cap, max(self.first, base * self.rng.uniform(0.8, 1.2)))

    def reset(self) -> None:
        self.failures = 0
