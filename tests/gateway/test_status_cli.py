"""`meterd status` against a real ApiServer on 127.0.0.1:0 (the CLI is blocking: it runs in a thread here)."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
import types
from collections.abc import AsyncIterator
from zoneinfo import ZoneInfo

import pytest

from gateway import status_cli
from gateway.api import ApiConfig, ApiServer
from gateway.metrics import Metrics
from gateway.model import Outcome, Reason, RoundStats
from gateway.stats import CollectionStats


def fill(stats: CollectionStats, now: float) -> None:
    done = RoundStats(plan="daily-frozen", round_id="daily-1", started=now - 600, expected=4)
    stats.round_started(done)
    for meter, reason in (("000000000001", None), ("000000000002", None), ("000000000003", None),
                          ("000000000004", Reason.NO_REPLY)):
        stats.outcome("daily-1", Outcome(meter, ok=reason is None, reason=reason, detail="3 tries [/bold] :x:"),
                      plan="daily-frozen", link="rs485-1", area="north")
    done.finished = now - 540
    stats.round_finished(done)
    running = RoundStats(plan="quarter-hour", round_id="q-17", started=now - 5, expected=10)
    stats.round_started(running)
    for i in range(4):
        stats.outcome("q-17", Outcome(f"00000000001{i}", ok=True), plan="quarter-hour", link="dtu-7", area="south")
    stats.link_state("rs485-1", True)
    stats.link_state("dtu-7", False, "peer gone")


@pytest.fixture
async def daemon(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ApiServer]:
    monkeypatch.setenv("COLUMNS", "200")
    now = time.time()
    stats = CollectionStats("north-station", ZoneInfo("Asia/Shanghai"), clock=lambda: now)
    fill(stats, now)
    sinks = {"influx": {"state": "retrying", "sent": 1200, "dropped": 0, "backlog": 35}}
    srv = ApiServer(ApiConfig(listen="127.0.0.1:0", token="tok"), stats, Metrics(stats),
                    journal_ok=lambda: True, links_up=stats.links_up, extra={"sinks": lambda: sinks})
    await srv.start()
    yield srv
    await srv.stop()


def args(url: str, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    status_cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["status", "--url", url, *extra])


async def test_table_shows_plans_ratios_links_failing_meters_and_sections(daemon: ApiServer,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = await asyncio.to_thread(status_cli.run, args(daemon.url, "--token", "tok"))
    out = capsys.readouterr().out
    assert code == 0
    for text in ("north-station", "daily-frozen", "quarter-hour", "75.0%", "no_reply 1", "q-17", "4/10",
                 "rs485-1", "DOWN", "peer gone", "000000000004", "3 tries [/bold] :x:", "influx", "retrying"):
        assert text in out, text


async def test_json(daemon: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    code = await asyncio.to_thread(status_cli.run, args(daemon.url, "--token", "tok", "--json"))
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["station"] == "north-station"
    assert data["today"]["plans"]["daily-frozen"]["success_ratio"] == 0.75 and data["sinks"]["influx"]["backlog"] == 35


async def test_watch_until_ctrl_c(daemon: ApiServer, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []

    def sleep(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(status_cli, "time", types.SimpleNamespace(sleep=sleep, time=time.time))
    code = await asyncio.to_thread(status_cli.run, args(daemon.url, "--token", "tok", "--watch"))
    assert code == 0 and calls == [2.0, 2.0, 2.0]
    assert "daily-frozen" in capsys.readouterr().out


async def test_wrong_token_is_explained(daemon: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    code = await asyncio.to_thread(status_cli.run, args(daemon.url, "--token", "nope"))
    assert code == 1 and "token" in capsys.readouterr().err


def test_daemon_not_running(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    assert status_cli.run(args(f"http://127.0.0.1:{port}")) == 1
    err = capsys.readouterr().err
    assert "meterd is not running at" in err and str(port) in err
    assert status_cli.run(args("ftp://127.0.0.1:1")) == 1
