"""Stream framer: bytes from a bus or socket in, frames and typed errors out.

Handles everything a real line does to frames: FE before and after frames,
garbage between them, 0x16/0xFE/0x68 inside a frame, frames split across
reads and several frames in one read, bad checksums (resync one byte later),
a doubled 68, and local echo of our own requests. It never raises on input.
Time is not its business: the owner calls `flush()` when the line has been
quiet for the inter-byte timeout, which turns a pending partial frame into
`TruncatedFrame`.
"""

from __future__ import annotations

from collections import Counter
from enum import Enum

from protocols.dlt645.errors import BadChecksum, BadEnd, FrameError, Garbage, TruncatedFrame
from protocols.dlt645.frame import _ADDRESSES, UNSCRAMBLE, Frame, remember_address

Event = Frame | FrameError


class Accept(Enum):
    """Which direction this side wants: a master drops requests (its own echo), a meter drops replies."""

    REPLIES = "replies"
    REQUESTS = "requests"
    ALL = "all"


class Framer:
    """Incremental framer. `feed()` returns the events the new bytes completed.

    `stats` counts frames, dropped echo frames, bad checksums, bad end bytes,
    garbage bytes and truncations, so a link can export them.
    """

    def __init__(self, accept: Accept = Accept.ALL, *, max_buffer: int = 4096) -> None:
        self.accept = accept
        self.max_buffer = max_buffer
        self.stats: Counter[str] = Counter()
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        self._buf += data
        buf = self._buf
        events: list[Event] = []
        junk = bytearray()
        pos, n = 0, len(buf)
        while pos < n:
            start = buf.find(b"\x68", pos)
            if start < 0:
                start = n
            if start > pos:  # FE around frames is normal; anything else is garbage
                junk += buf[pos:start]
                pos = start
                continue
            end = self._frame_at(buf, pos, events, junk)
            if end == _NEED_MORE:
                break  # a whole frame may yet arrive; `flush` decides when the line has gone quiet
            if end == _NOT_A_FRAME:
                junk.append(0x68)
                pos += 1
            else:
                pos = end
        self._report_junk(events, junk)
        del buf[:pos]
        if len(buf) > self.max_buffer:  # bounded memory whatever arrives
            self._report_junk(events, bytearray(buf))
            buf.clear()
        return events

    def flush(self) -> list[Event]:
        """The line went quiet: the held-back candidate will never complete.

        It is reported as truncated, and any whole frame behind it (after a
        stray 68 whose fake L made us wait) is still delivered. Waiting for
        the quiet, rather than guessing earlier, is what keeps a real frame
        whose DATA happens to contain a frame-shaped run from being split.
        """
        events: list[Event] = []
        while self._buf.strip(b"\xfe"):
            later = self._complete_later(self._buf, 0)
            cut = later if later > 0 else len(self._buf)
            rest = bytes(self._buf[:cut])
            del self._buf[:cut]
            self.stats["truncated"] += 1
            events.append(TruncatedFrame(f"{len(rest)} bytes of an incomplete frame when the line went quiet", rest))
            events += self.feed(b"")
        self._buf.clear()
        return events

    def reset(self) -> None:
        """Forget held-back bytes (e.g. after a reconnect)."""
        self._buf.clear()

    def _report_junk(self, events: list[Event], junk: bytearray) -> None:
        if not junk:
            return
        text = bytes(junk).strip(b"\xfe")
        junk.clear()
        if text:
            self.stats["garbage_bytes"] += len(text)
            events.append(Garbage(f"{len(text)} bytes outside any frame", text))

    def _frame_at(self, buf: bytearray, i: int, events: list[Event], junk: bytearray) -> int:
        """Try a frame at `i`: the offset after it, or a negative status.

        A bad checksum or end byte is reported and the candidate's first byte
        skipped, so a real frame starting inside it is still found.
        """
        n = len(buf)
        if n - i < 12:
            return _NEED_MORE if n - i < 8 or buf[i + 7] == 0x68 else _NOT_A_FRAME
        if buf[i + 7] != 0x68:
            return _NOT_A_FRAME
        end = i + 10 + buf[i + 9]
        if n < end + 2:
            return _NEED_MORE
        cs = sum(buf[i:end]) & 0xFF
        error: FrameError | None = None
        if cs != buf[end]:
            self.stats["bad_checksum"] += 1
            error = BadChecksum(f"checksum {buf[end]:02X}, computed {cs:02X}", bytes(buf[i : end + 2]),
                                expected=cs, found=buf[end])
        elif buf[end + 1] != 0x16:
            self.stats["bad_end"] += 1
            error = BadEnd(f"expected 16 after the checksum, found {buf[end + 1]:02X}", bytes(buf[i : end + 2]))
        if error is not None:
            self._report_junk(events, junk)
            events.append(error)
            return _NOT_A_FRAME
        self._report_junk(events, junk)
        control = buf[i + 8]
        if self.accept is not Accept.ALL and bool(control & 0x80) != (self.accept is Accept.REPLIES):
            self.stats["echo"] += 1
            return end + 2
        self.stats["frames"] += 1
        wire = bytes(buf[i + 1 : i + 7])
        events.append(_new(Frame, (_ADDRESSES.get(wire) or remember_address(wire), control,
                                   bytes(buf[i + 10 : end]).translate(UNSCRAMBLE))))
        return end + 2

    def _complete_later(self, buf: bytearray, i: int) -> int:
        """Offset of the first whole valid frame after `i`, or -1.

        Used when the line went quiet: a stray 68 in garbage may carry a fake
        L that makes a candidate wait for bytes that never come.
        """
        j = buf.find(b"\x68", i + 1)
        while 0 <= j <= len(buf) - 12:
            if buf[j + 7] == 0x68:
                end = j + 10 + buf[j + 9]
                if end + 2 <= len(buf) and sum(buf[j:end]) & 0xFF == buf[end] and buf[end + 1] == 0x16:
                    return j
            j = buf.find(b"\x68", j + 1)
        return -1


_new = tuple.__new__
_NEED_MORE = -1
_NOT_A_FRAME = -2
