"""Logging for the daemon: one line per event worth reading, never a flood of repeats.

`MeterLog` de-duplicates per meter: a meter's first failure is a WARNING, repeats are DEBUG with a
count, and the first success after failures is an INFO "recovered after N failures".

Frame tracing is per link: `trace_logger("bus1")` is the logger `meterd.trace.bus1`, silent unless
`set_trace("bus1", True)`; then its DEBUG lines pass whatever the daemon's level is. Guard hot
paths with `if trace.isEnabledFor(logging.DEBUG):` so hex dumps cost nothing when tracing is off.
"""

from __future__ import annotations

import datetime as dt
import json as jsonlib
import logging
import os
import sys
from typing import TextIO

log = logging.getLogger("meterd.meters")

TRACE = "meterd.trace"
_OFF = logging.CRITICAL + 10
_traced: set[str] = set()


class MeterLog:
    """Per-meter failure de-duplication; memory is one counter per meter that is failing now."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self.logger = logger
        self.failing: dict[str, int] = {}

    def failure(self, meter: str, reason: str, detail: str = "") -> None:
        n = self.failing.get(meter, 0) + 1
        self.failing[meter] = n
        why = f"{reason}: {detail}" if detail else reason
        if n == 1:
            self.logger.warning("meter %s: %s", meter, why)
        else:
            self.logger.debug("meter %s: %s (%d failures in a row)", meter, why, n)

    def success(self, meter: str) -> None:
        n = self.failing.pop(meter, 0)
        if n:
            self.logger.info("meter %s: recovered after %d failure%s", meter, n, "" if n == 1 else "s")

    def forget(self, meter: str) -> None:
        """The meter left the configuration: no recovery line will ever come."""
        self.failing.pop(meter, None)


def trace_logger(link: str) -> logging.Logger:
    """The frame-trace logger of a link (`meterd.trace.<link>`): DEBUG when enabled, silent otherwise."""
    logger = logging.getLogger(f"{TRACE}.{link}")
    logger.setLevel(logging.DEBUG if link in _traced else _OFF)
    return logger


def set_trace(link: str, enabled: bool) -> None:
    """Switch frame tracing of one link on or off (config or reload); takes effect at once."""
    if enabled:
        _traced.add(link)
    else:
        _traced.discard(link)
    trace_logger(link)


def traced_links() -> set[str]:
    return set(_traced)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, exception."""

    def format(self, record: logging.LogRecord) -> str:
        data = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return jsonlib.dumps(data, ensure_ascii=False)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")


class JournalFormatter(logging.Formatter):
    """Under systemd: `<priority>` prefix (so `journalctl -p warning` works), no timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        n = record.levelno
        prio = 7 if n <= logging.DEBUG else 6 if n < logging.WARNING else 4 if n < logging.ERROR else 3 \
            if n < logging.CRITICAL else 2
        return f"<{prio}>" + super().format(record).replace("\n", f"\n<{prio}>")


def _is_journal(stream: TextIO) -> bool:
    """True when `stream` is the journald stream systemd connected us to ($JOURNAL_STREAM = dev:inode)."""
    try:
        dev, ino = (int(part) for part in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):  # not set, malformed, or not a real file (tests, pipes)
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(level: int | str = logging.INFO, json: bool = False, *, stream: TextIO | None = None) -> None:
    """Configure the root logger for the daemon (replaces any handlers it had)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if json:
        handler.setFormatter(JsonFormatter())
    elif _is_journal(handler.stream):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                                               "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for noisy in ("aiohttp.access", "asyncio"):  # a scrape every 15 s is not an event
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for link in _traced:
        trace_logger(link)
