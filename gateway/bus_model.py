"""The bus's vocabulary: priorities, timing and the errors a transaction ends with.

Kept apart from `gateway.bus` so the reply side (`gateway.bus_answer`) can use them; import them
from `gateway.bus`, which re-exports them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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
