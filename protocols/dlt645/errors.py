"""Typed errors of the DL/T 645 codec.

Every way a byte string can fail to be a frame has its own class, so callers
(and counters) can tell a line-noise problem from a meter that answers wrong.
"""

from __future__ import annotations


class Dlt645Error(Exception):
    """Base of every error raised by `protocols.dlt645`."""


class FrameError(Dlt645Error):
    """The bytes are not a valid DL/T 645 link frame."""

    reason = "bad_frame"

    def __init__(self, message: str, data: bytes = b"") -> None:
        super().__init__(message)
        self.data = bytes(data)


class TruncatedFrame(FrameError):
    """Fewer bytes than the header or the L field promise."""

    reason = "truncated"


class BadStart(FrameError):
    """No 0x68 where a start byte must be (first or second start byte)."""

    reason = "bad_start"


class BadEnd(FrameError):
    """The byte after the checksum is not 0x16."""

    reason = "bad_end"


class BadChecksum(FrameError):
    """The sum of the frame bytes does not match the CS byte."""

    reason = "bad_checksum"

    def __init__(self, message: str, data: bytes = b"", *, expected: int = 0, found: int = 0) -> None:
        super().__init__(message, data)
        self.expected = expected
        self.found = found


class TrailingBytes(FrameError):
    """`parse` was given one frame followed by bytes that are neither FE nor empty."""

    reason = "trailing_bytes"


class Garbage(FrameError):
    """Bytes on a stream that belong to no frame (reported by the stream framer)."""

    reason = "garbage"


class AddressError(Dlt645Error, ValueError):
    """A meter address that is not 12 digits (with optional A wildcards)."""


class EncodeError(Dlt645Error, ValueError):
    """A value that does not fit the format it must be encoded in."""


class DecodeError(Dlt645Error, ValueError):
    """A frame that is well formed but whose data cannot be understood."""
