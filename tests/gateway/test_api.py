"""The ops HTTP server on a real 127.0.0.1 socket: /healthz, /metrics, /api/v1/status, tokens, errors;
and the Prometheus exposition itself (parsed with prometheus_client.parser)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from gateway.api import ApiConfig, ApiError, ApiServer, reply
from gateway.metrics import Metrics
from gateway.model import Outcome, Reason, RoundStats
from gateway.stats import CollectionStats

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def stats() -> CollectionStats:
    clock = [1_714_500_000.0]
    stats = CollectionStats("st-01", ZoneInfo("Asia/Shanghai"), clock=lambda: clock[0], degraded_after=1)
    rs = RoundStats(plan="daily", round_id="d-1", started=clock[0], expected=4)
    stats.round_started(rs)
    for meter, reason, area in (("01", None, "north"), ("02", None, "north"), ("03", Reason.NO_REPLY, "south"),
                                ("04", Reason.BAD_FRAME, "south")):
        stats.outcome("d-1", Outcome(meter, ok=reason is None, reason=reason), plan="daily", link="bus1", area=area)
    clock[0] += 42
    stats.round_finished(rs)
    stats.link_state("bus1", True)
    stats.link_state("dtu-7", False, "no registration")
    return stats


class Probes:
    def __init__(self) -> None:
        self.journal = True
        self.links = 1


@pytest.fixture
def probes() -> Probes:
    return Probes()


@pytest.fixture
async def server(stats: CollectionStats, probes: Probes) -> AsyncIterator[ApiServer]:
    srv = ApiServer(ApiConfig(listen="127.0.0.1:0", token="s3cret-token"), stats, Metrics(stats),
                    journal_ok=lambda: probes.journal, links_up=lambda: probes.links,
                    extra={"journal": lambda: {"backlog": 7, "dropped": 0}}, heartbeat=0.05, max_loop_lag=0.1)

    async def echo(request: web.Request) -> web.Response:
        if request.query.get("bad"):
            raise ApiError(400, "bad address: 12")
        return reply({"echo": request.match_info["x"]})

    srv.add_routes([web.get("/api/v1/echo/{x}", echo)])
    await srv.start()
    yield srv
    await srv.stop()


async def echo_nothing(request: web.Request) -> web.Response:
    return reply({})


async def get(url: str, token: str | None = None) -> tuple[int, dict[str, str], str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.text()


async def test_healthz_follows_the_probes(server: ApiServer, probes: Probes) -> None:
    await asyncio.sleep(0.06)  # one heartbeat
    status, _, body = await get(f"{server.url}/healthz")
    assert status == 200 and '"status": "ok"' in body
    probes.journal = False
    status, _, body = await get(f"{server.url}/healthz")
    assert status == 503 and '"journal": {"ok": false}' in body
    probes.journal, probes.links = True, 0
    status, _, body = await get(f"{server.url}/healthz")
    assert status == 503 and '"links": {"ok": false, "up": 0}' in body
    probes.links = 2
    assert (await get(f"{server.url}/healthz"))[0] == 200


async def test_healthz_sees_a_stalled_loop(server: ApiServer) -> None:
    await asyncio.sleep(0.06)
    time.sleep(0.3)  # a blocking call somewhere stalls the loop
    await asyncio.sleep(0.01)  # the heartbeat runs late and measures the stall
    ok, detail = server.health()
    assert not ok and detail["checks"]["loop"]["lag"] >= 0.2
    await asyncio.sleep(0.12)  # responsive again
    assert server.health()[0]

    def broken() -> bool:
        raise ZeroDivisionError("journal probe")

    server.journal_ok = broken
    ok, detail = server.health()
    assert not ok and "ZeroDivisionError" in detail["checks"]["journal"]["error"]


async def test_token_protects_the_api_only(server: ApiServer) -> None:
    status, headers, body = await get(f"{server.url}/api/v1/status")
    assert status == 401 and "Bearer" in headers["WWW-Authenticate"] and '"error"' in body
    status, _, body = await get(f"{server.url}/api/v1/status", token="wrong")
    assert (status, body) == (401, '{"error": "wrong token"}')
    assert (await get(f"{server.url}/api/v1/echo/7", token="wrong"))[0] == 401  # routes added later too
    status, _, body = await get(f"{server.url}/api/v1/status", token="s3cret-token")
    assert status == 200 and '"station": "st-01"' in body and '"journal": {"backlog": 7' in body
    assert (await get(f"{server.url}/metrics"))[0] == 200
    assert (await get(f"{server.url}/healthz"))[0] in (200, 503)


async def test_added_routes_and_json_errors(server: ApiServer) -> None:
    assert (await get(f"{server.url}/api/v1/echo/7", token="s3cret-token"))[2] == '{"echo": "7"}'
    status, _, body = await get(f"{server.url}/api/v1/echo/7?bad=1", token="s3cret-token")
    assert (status, body) == (400, '{"error": "bad address: 12"}')
    status, headers, body = await get(f"{server.url}/nothing-here")
    assert status == 404 and headers["Content-Type"].startswith("application/json") and '"error"' in body
    async with aiohttp.ClientSession() as session, session.post(f"{server.url}/metrics") as resp:
        assert resp.status == 405 and "GET" in resp.headers["Allow"] and "error" in await resp.json()
    with pytest.raises(RuntimeError):
        server.add_routes([web.get("/late", echo_nothing)])


async def test_metrics_endpoint_serves_the_exposition(server: ApiServer) -> None:
    server.metrics.register_gauge_callback("meterd_journal_backlog", "Readings not yet forwarded", [],
                                           lambda: 7.0)
    status, headers, body = await get(f"{server.url}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    got = parse(body)
    assert got[("meterd_collection_plan_success_ratio", (("plan", "daily"),))] == 0.5
    assert got[("meterd_journal_backlog", ())] == 7


async def test_status_section_errors_do_not_hide_the_rest(stats: CollectionStats, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    srv = ApiServer(ApiConfig(listen="127.0.0.1:0", token_file=token_file), stats,  # makes its own Metrics
                    journal_ok=lambda: True, links_up=lambda: 1, extra={"sinks": lambda: 1 / 0})
    await srv.start()
    try:
        status, _, body = await get(f"{srv.url}/api/v1/status", token="from-file")
        assert status == 200 and '"sinks": {"error": "ZeroDivisionError' in body and '"today"' in body
    finally:
        await srv.stop()
    with pytest.raises(ValueError, match="built-in"):
        srv.add_section("today", dict)


def test_api_config_validation(tmp_path: Path) -> None:
    assert ApiConfig().listen == "127.0.0.1:8645"
    assert ApiConfig(listen="[::1]:9000").listen == "[::1]:9000"
    bad: list[dict[str, Any]] = [{"listen": "8645"}, {"listen": "host:99999"}, {"bind": "x"},
                                 {"token": "a", "token_file": "/etc/meterd/token"}, {"token": " "}]
    for fields in bad:
        with pytest.raises(ValidationError):
            ApiConfig.model_validate(fields)
    with pytest.raises(ValueError, match="token_file"):
        ApiConfig(token_file=tmp_path / "missing").resolved_token()


# --- the exposition itself -------------------------------------------------------------------------
def test_collection_statistics_exposed(stats: CollectionStats) -> None:
    got = parse(Metrics(stats).exposition().decode())
    assert got[("meterd_collection_plan_success_ratio", (("plan", "daily"),))] == 0.5
    assert got[("meterd_collection_area_success_ratio", (("area", "north"),))] == 1.0
    assert got[("meterd_collection_area_success_ratio", (("area", "south"),))] == 0.0
    assert got[("meterd_collection_plan_failed", (("plan", "daily"), ("reason", "no_reply")))] == 1
    assert got[("meterd_rounds_total", (("plan", "daily"),))] == 1
    assert got[("meterd_outcomes_total", (("plan", "daily"), ("result", "ok")))] == 2
    assert got[("meterd_outcomes_total", (("plan", "daily"), ("result", "bad_frame")))] == 1
    assert got[("meterd_meters_degraded", ())] == 2
    assert got[("meterd_link_up", (("link", "bus1"),))] == 1
    assert got[("meterd_link_up", (("link", "dtu-7"),))] == 0
    assert got[("meterd_last_round_duration_seconds", (("plan", "daily"),))] == 42
    assert got[("meterd_info", (("station", "st-01"), ("timezone", "Asia/Shanghai")))] == 1
    stats.link_state("dtu-7", True)  # read at scrape time, not cached
    assert parse(Metrics(stats).exposition().decode())[("meterd_link_up", (("link", "dtu-7"),))] == 1


def test_callbacks_and_separate_registries(stats: CollectionStats) -> None:
    one, two = Metrics(stats), Metrics(stats)  # two daemons in one process: no collision
    backlog = {"influx": 12, "mqtt": 0}
    one.register_gauge_callback("meterd_sink_backlog", "Readings waiting, per sink", ["sink"],
                                lambda: {(k,): float(v) for k, v in backlog.items()})
    one.register_gauge_callback("meterd_journal_appended", "Readings appended", [], lambda: 1234.0, kind="counter")
    two.register_gauge_callback("meterd_sink_backlog", "another daemon", ["sink"], lambda: {("x",): 1.0})
    got = parse(one.exposition().decode())
    assert got[("meterd_sink_backlog", (("sink", "influx"),))] == 12
    assert got[("meterd_journal_appended_total", ())] == 1234
    backlog["influx"] = 3
    assert parse(one.exposition().decode())[("meterd_sink_backlog", (("sink", "influx"),))] == 3
    assert ("meterd_sink_backlog", (("sink", "x"),)) in parse(two.exposition().decode())
    with pytest.raises(ValueError, match="already registered"):
        one.register_gauge_callback("meterd_sink_backlog", "dup", ["sink"], dict)
    with pytest.raises(ValueError, match="reserved"):
        one.register_gauge_callback("meterd_link_up", "clash", [], lambda: 1.0)
    with pytest.raises(ValueError, match="bad metric name"):
        one.register_gauge_callback("bad-name", "x", [], lambda: 1.0)


def test_broken_callback_is_skipped_counted_and_logged_once(stats: CollectionStats,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics(stats)

    def broken() -> float:
        raise RuntimeError("journal closed")

    metrics.register_gauge_callback("meterd_journal_backlog", "x", [], broken)
    metrics.register_gauge_callback("meterd_wrong_labels", "x", ["sink"], lambda: {("a", "b"): 1.0})
    got = parse(metrics.exposition().decode())
    metrics.exposition()
    assert ("meterd_journal_backlog", ()) not in got
    assert got[("meterd_collection_plan_success_ratio", (("plan", "daily"),))] == 0.5  # the rest is served
    assert parse(metrics.exposition().decode())[("meterd_metrics_callback_errors_total", ())] == 6
    assert sum("journal closed" in r.message for r in caplog.records) == 1
