"""Per-meter log de-duplication, per-link frame tracing and the daemon's log format."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.logs import MeterLog, set_trace, setup_logging, trace_logger, traced_links


def test_first_failure_warns_repeats_debug_recovery_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="meterd.meters")
    meters = MeterLog()
    for _ in range(3):
        meters.failure("000000000001", "no_reply")
    meters.failure("000000000002", "abnormal_reply", "ERR 0x04 (password wrong)")
    meters.success("000000000001")
    meters.success("000000000003")  # never failed: nothing to say
    seen = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert seen == [
        (logging.WARNING, "meter 000000000001: no_reply"),
        (logging.DEBUG, "meter 000000000001: no_reply (2 failures in a row)"),
        (logging.DEBUG, "meter 000000000001: no_reply (3 failures in a row)"),
        (logging.WARNING, "meter 000000000002: abnormal_reply: ERR 0x04 (password wrong)"),
        (logging.INFO, "meter 000000000001: recovered after 3 failures"),
    ]
    assert meters.failing == {"000000000002": 1}  # memory: only meters failing now
    caplog.clear()
    meters.failure("000000000001", "bad_frame")  # a new episode warns again
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    meters.forget("000000000002")
    assert "000000000002" not in meters.failing


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


def test_trace_is_per_link_and_off_by_default(root_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    setup_logging("INFO", stream=out)  # the daemon logs at INFO
    bus1, bus2 = trace_logger("t-bus1"), trace_logger("t-bus2")
    assert bus1.name == "meterd.trace.t-bus1"
    assert not bus1.isEnabledFor(logging.DEBUG) and not bus1.isEnabledFor(logging.CRITICAL)
    set_trace("t-bus1", True)
    try:
        assert bus1.isEnabledFor(logging.DEBUG) and not bus2.isEnabledFor(logging.DEBUG)
        bus1.debug("tx 68 01 00 00 00 00 00 68 11 04 33 33 34 33 b3 16")
        bus2.debug("tx never shown")
        [line] = out.getvalue().splitlines()  # shown although the daemon logs at INFO
        assert line.endswith("DEBUG   meterd.trace.t-bus1: tx 68 01 00 00 00 00 00 68 11 04 33 33 34 33 b3 16")
        assert "t-bus1" in traced_links()
    finally:
        set_trace("t-bus1", False)
    assert not bus1.isEnabledFor(logging.DEBUG)


def test_setup_logging_text_and_json(root_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    setup_logging("info", stream=out)
    logging.getLogger("meterd.bus").info("link %s up", "bus1")
    logging.getLogger("meterd.bus").debug("not shown")
    logging.getLogger("aiohttp.access").info("GET /metrics 200")
    [line] = out.getvalue().splitlines()
    assert line.endswith("INFO    meterd.bus: link bus1 up")
    out = io.StringIO()
    setup_logging(logging.DEBUG, json=True, stream=out)
    logging.getLogger("meterd.bus").warning("meter %s: %s", "000000000001", "no_reply")
    record = json.loads(out.getvalue())
    assert record["level"] == "WARNING" and record["message"] == "meter 000000000001: no_reply"
    assert record["logger"] == "meterd.bus" and record["time"].endswith("+00:00")


def test_setup_logging_under_journald_uses_priorities(root_logging: None, monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    path = tmp_path / "journal-stream"
    with path.open("w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")  # what systemd sets for our stderr
        setup_logging("INFO", stream=stream)
        logging.getLogger("meterd.bus").warning("link bus2 down: connection refused")
        logging.getLogger("meterd.bus").info("link bus2 up")
    assert path.read_text() == "<4>meterd.bus: link bus2 down: connection refused\n<6>meterd.bus: link bus2 up\n"
    out = io.StringIO()
    setup_logging("INFO", stream=out)  # JOURNAL_STREAM inherited, but this is not that stream
    logging.getLogger("meterd.bus").info("link bus2 up")
    assert not out.getvalue().startswith("<")
