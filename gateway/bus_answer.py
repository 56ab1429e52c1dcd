"""The reply side of one bus transaction (see `gateway.bus`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.bus_model import BadFrame, BusError, NoReply, Timing
from gateway.links.base import LinkDown
from protocols.dlt645 import Frame, FrameError

if TYPE_CHECKING:
    from gateway.bus import Bus


class Answer:
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
