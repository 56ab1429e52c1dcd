"""A read that may span several frames (follow-up 12 / 1997 02), as a small state object.

The owner sends `request`, feeds each reply to `feed()`, and sends what it
returns until it returns None; `reply` is then the whole answer decoded from
the joined payloads.
"""

from __future__ import annotations

from protocols.dlt645.errors import DecodeError
from protocols.dlt645.replies import Reply, decode_data
from protocols.dlt645.requests import read_follow_up, read_request


class ReadSequence:
    def __init__(self, address: str, di: int, edition: int = 2007, *, max_frames: int = 64,
                 preamble: int = 0, tariffs: int = 4) -> None:
        self.address = address
        self.di = di
        self.edition = edition
        self.max_frames = max_frames
        self.preamble = preamble
        self.tariffs = tariffs
        self.request = read_request(address, di, edition, preamble=preamble)
        self.frames = 0
        self.reply: Reply | None = None
        self._parts: list[bytes] = []

    @property
    def done(self) -> bool:
        return self.reply is not None

    def feed(self, reply: Reply) -> bytes | None:
        """Take one reply; return the next request to send, or None when the answer is complete."""
        if self.reply is not None:
            raise DecodeError("the read is already complete")
        self.frames += 1
        if reply.error is not None:
            self.reply = reply
            return None
        if reply.di != self.di:
            raise DecodeError(f"reply for DI {reply.di}, expected {self.di:X}")
        if self.edition == 2007 and self.frames > 1 and reply.seq != self.frames - 1:
            raise DecodeError(f"follow-up SEQ {reply.seq}, expected {self.frames - 1}")
        self._parts.append(reply.payload)
        if reply.more:
            if self.frames >= self.max_frames:
                raise DecodeError(f"meter still has more after {self.frames} frames")
            return read_follow_up(self.address, self.di, self.frames, self.edition, preamble=self.preamble)
        if self.frames == 1:
            self.reply = reply
            return None
        payload = b"".join(self._parts)
        decoded = decode_data(self.di, payload, self.edition, tariffs=self.tariffs)
        self.reply = reply._replace(values=decoded.values, payload=payload, complete=decoded.complete,
                                    seq=None, control=reply.control & ~0x20)
        return None
