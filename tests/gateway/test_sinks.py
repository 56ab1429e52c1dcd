"""Unit tests of gateway/sinks: the line-protocol schema, error classification, the run loop
against a scripted HTTP server on 127.0.0.1, config validation and MQTT payloads.

The journal here is a small in-memory fake of the five methods the sinks use."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import TypeAdapter, ValidationError

from gateway.model import Quality, Reading, Reason, RoundStats
from gateway.sinks import (
    InfluxSink,
    InfluxSinkConfig,
    MqttSink,
    MqttSinkConfig,
    SinkConfig,
    Verdict,
    build_sink,
    classify,
)
from gateway.sinks.base import parse_retry_after
from gateway.sinks.lineproto import field_value, measurement_of, reading_lines, round_lines
from gateway.sinks.mqtt import round_payload

T0 = 1_700_000_000


class FakeJournal:
    """In-memory stand-in for gateway.journal: ids ascending, cursors per name."""

    def __init__(self) -> None:
        self.readings: list[tuple[int, Reading]] = []
        self.rounds: list[tuple[int, RoundStats]] = []
        self.cursors: dict[str, int] = {}
        self.round_cursors: dict[str, int] = {}
        self.advances: list[int] = []
        self.reads = 0
        self._next = 1

    def add(self, *readings: Reading) -> None:
        for r in readings:
            self.readings.append((self._next, r))
            self._next += 1

    def add_round(self, stats: RoundStats) -> None:
        self.rounds.append((self._next, stats))
        self._next += 1

    async def read_batch(self, cursor: str, limit: int) -> list[tuple[int, Reading]]:
        self.reads += 1
        pos = self.cursors.get(cursor, 0)
        return [e for e in self.readings if e[0] > pos][:limit]

    async def advance(self, cursor: str, upto_id: int) -> None:
        self.advances.append(upto_id)
        self.cursors[cursor] = upto_id

    async def backlog(self, cursor: str) -> int:
        pos = self.cursors.get(cursor, 0)
        return sum(1 for i, _ in self.readings if i > pos)

    async def read_rounds(self, cursor: str, limit: int) -> list[tuple[int, RoundStats]]:
        pos = self.round_cursors.get(cursor, 0)
        return [e for e in self.rounds if e[0] > pos][:limit]

    async def advance_rounds(self, cursor: str, upto_id: int) -> None:
        self.round_cursors[cursor] = upto_id


def reading(meter: str = "000000000001", quantity: str = "forward_active_energy", value: Any = 1.5,
            t: float = T0, **kw: Any) -> Reading:
    return Reading(meter=meter, quantity=quantity, value=value, unit=kw.pop("unit", "kWh"), time=t,
                   collected=t + 1, station=kw.pop("station", "north"), link=kw.pop("link", "rs485-1"), **kw)


# --- schema ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("quantity", "family"), [
    ("forward_active_energy", "energy"), ("forward_active_energy_t2_last3", "energy"),
    ("reverse_active_energy_a", "energy"), ("daily_freeze_forward_active_energy_last1", "energy"),
    ("forward_active_max_demand_t1", "demand"), ("forward_active_max_demand_time", "demand"),
    ("active_demand", "demand"), ("demand_period", "other"),
    ("voltage_a", "voltage"), ("clock_battery_voltage", "voltage"), ("rated_voltage", "other"),
    ("current_b", "current"), ("neutral_current", "current"), ("max_current", "other"),
    ("active_power", "power"), ("reactive_power_c", "power"), ("average_active_power", "power"),
    ("power_factor_a", "power_factor"), ("frequency", "frequency"), ("phase_angle_b", "phase_angle"),
    ("voltage_thd_a", "harmonics"), ("current_harmonic_b_5", "harmonics"),
    ("status_word_3", "status"), ("status_byte", "status"), ("date", "clock"), ("time", "clock"),
    ("daily_freeze_time_last1", "clock"), ("remaining_money", "prepaid"), ("overdraft_energy", "prepaid"),
    ("alarm_amount_1", "prepaid"), ("close_allowed_amount", "prepaid"), ("trip_count", "event"),
    ("trip_time", "event"), ("power_down_count", "event"), ("meter_clear_forward_active_energy", "event"),
    ("cover_open_start", "event"), ("temperature", "other"), ("tariff_count", "other"),
])
def test_measurement_by_quantity_family(quantity: str, family: str) -> None:
    assert measurement_of(quantity) == family


@pytest.mark.parametrize(("value", "text"), [
    (220.0, "220.0"), (1.5, "1.5"), (-0.001, "-0.001"), (1e16, "1.0e+16"), (0.0, "0.0"),
    (5, "5i"), (0, "0i"), (-7, "-7i"), (True, "true"), (False, "false"),
    ("abc", '"abc"'), ('say "hi" \\ there', r'"say \"hi\" \\ there"'), ("two\nlines", r'"two\nlines"'),
    (None, None), (float("nan"), None), (float("inf"), None), (2**63, None),
])
def test_field_values_have_one_type_each(value: Any, text: str | None) -> None:
    assert field_value(value) == text


def test_field_types_never_depend_on_the_value() -> None:
    lines = reading_lines([reading(value=220.0, t=T0), reading(value=221.25, t=T0 + 60),
                           reading(quantity="trip_count", value=3, t=T0),
                           reading(quantity="trip_count", value=0, t=T0 + 60)])
    assert "forward_active_energy=220.0 " in lines[0]
    assert all("trip_count=" not in line or "i " in line.split("trip_count=")[1][:4] for line in lines)


def test_escaping_of_measurement_tags_and_strings() -> None:
    r = reading(meter="a b,c=d", station="St 1", link="l=1", quantity="model", value='x "y"\\z', unit="")
    (line,) = reading_lines([r])
    assert line == f'other,link=l\\=1,meter=a\\ b\\,c\\=d,station=St\\ 1 model="x \\"y\\"\\\\z" {T0}'


def test_same_meter_measurement_and_second_merge_into_one_line() -> None:
    readings = [
        reading(quantity="forward_active_energy", value=10.5, t=T0 + 0.4),
        reading(quantity="forward_active_energy_t1", value=4.25, t=T0 + 0.9),  # same second
        reading(quantity="voltage_a", value=230.1, unit="V"),  # other measurement
        reading(meter="000000000002", value=7.0),  # other meter
        reading(quantity="forward_active_energy", value=9.0, t=T0 - 86400, frozen=True),  # frozen: own series
        reading(quantity="forward_active_energy", value=11.0, t=T0 + 900),  # later time
    ]
    assert reading_lines(readings) == [
        "energy,link=rs485-1,meter=000000000001,station=north "
        f"forward_active_energy=10.5,forward_active_energy_t1=4.25 {T0}",
        f"voltage,link=rs485-1,meter=000000000001,station=north voltage_a=230.1 {T0}",
        f"energy,link=rs485-1,meter=000000000002,station=north forward_active_energy=7.0 {T0}",
        f"energy,frozen=true,link=rs485-1,meter=000000000001,station=north forward_active_energy=9.0 {T0 - 86400}",
        f"energy,link=rs485-1,meter=000000000001,station=north forward_active_energy=11.0 {T0 + 900}",
    ]


def test_quality_none_and_empty_tags() -> None:
    readings = [reading(value=None), reading(quantity="forward_active_energy_t1", value=3.0, quality=Quality.INVALID),
                reading(quantity="date", value="2023-11-14", station="", link="")]
    assert reading_lines(readings) == [
        f'energy,link=rs485-1,meter=000000000001,station=north forward_active_energy_t1_quality="invalid" {T0}',
        f'clock,meter=000000000001 date="2023-11-14" {T0}',
    ]


def test_round_statistics_become_collection_lines() -> None:
    stats = RoundStats(plan="daily", round_id="daily-20231114", started=T0 + 0.5, station="north", expected=10,
                       collected=8, failed={Reason.NO_REPLY: 1, "bad_frame": 1}, skipped=1, finished=T0 + 43, reread=2)
    (line,) = round_lines([stats])
    head, fields, ts = line.split(" ")
    assert head == "collection,plan=daily,reread=2,station=north"
    assert ts == str(T0)
    values = dict(f.split("=", 1) for f in fields.split(","))
    assert values["expected"] == "10i" and values["collected"] == "8i" and values["skipped"] == "1i"
    assert values["success_ratio"] == "0.8" and values["duration"] == "42.5"
    assert values["failed_no_reply"] == "1i" and values["failed_bad_frame"] == "1i" and values["failed_busy"] == "0i"
    assert values["round_id"] == '"daily-20231114"'
    unfinished = round_lines([RoundStats(plan="p", round_id="r", started=T0)])[0]
    assert "duration" not in unfinished and "success_ratio=1.0" in unfinished and "station" not in unfinished


# --- classification -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("status", "verdict"), [
    (None, Verdict.RETRY), (500, Verdict.RETRY), (502, Verdict.RETRY), (503, Verdict.RETRY), (429, Verdict.RETRY),
    (408, Verdict.RETRY), (404, Verdict.RETRY), (413, Verdict.SPLIT), (400, Verdict.DROP), (422, Verdict.DROP),
    (406, Verdict.DROP), (401, Verdict.UNAUTHORIZED), (403, Verdict.UNAUTHORIZED), (302, Verdict.RETRY),
])
def test_classify(status: int | None, verdict: Verdict) -> None:
    assert classify(status) is verdict


def test_retry_after_seconds_and_dates() -> None:
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after("99999") == 600.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:30 GMT", now=T0) == pytest.approx(10.0)


# --- a scripted InfluxDB on 127.0.0.1 ----------------------------------------------------------------
Script = Callable[[int, list[str], "web.Request"], "tuple[int, dict[str, str]] | int"]


@dataclass
class Scripted:
    """Answers each write with `script(n, lines, request)`; records what it accepted."""

    script: Script
    url: str = ""
    requests: list[tuple[float, int, list[str]]] = field(default_factory=list)  # (time, status, lines)
    written: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp has already gunzipped a Content-Encoding: gzip body
        lines = [ln for ln in body.decode().split("\n") if ln]
        answer = self.script(len(self.requests), lines, request)
        status, headers = (answer, {}) if isinstance(answer, int) else answer
        self.requests.append((time.monotonic(), status, lines))
        if status == 204:
            self.written.extend(lines)
            return web.Response(status=204)
        return web.json_response({"error": f"scripted {status}", "message": f"scripted {status}"},
                                 status=status, headers=headers)


@pytest.fixture
async def server() -> AsyncIterator[Callable[[Script], Any]]:
    runners: list[web.AppRunner] = []

    async def start(script: Script) -> Scripted:
        scripted = Scripted(script)
        app = web.Application()
        app.router.add_post("/write", scripted.handle)
        app.router.add_post("/api/v2/write", scripted.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        scripted.url = f"http://127.0.0.1:{port}"
        return scripted

    yield start
    for runner in runners:
        await runner.cleanup()


def v1_sink(url: str, **kw: Any) -> InfluxSink:
    settings: dict[str, Any] = {"name": "influx", "url": url, "api": "v1", "database": "meters",
                                "retry_initial": 0.02, "retry_max": 0.1, "flush_interval": 0.05, **kw}
    return InfluxSink(InfluxSinkConfig(**settings))


async def run_until(sink: Any, journal: FakeJournal, done: Callable[[], bool], timeout: float = 5.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(journal, stop))
    try:
        async with asyncio.timeout(timeout):
            while not done():
                await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.wait_for(task, 2)


def state(sink: Any) -> str:
    """The sink's state, as a plain str (keeps mypy from narrowing the Literal between awaits)."""
    return str(sink.counters["state"])


def meters(n: int) -> list[Reading]:
    return [reading(meter=f"{i:012d}", value=float(i)) for i in range(n)]


async def test_500_is_retried_then_the_cursor_advances(server: Any, caplog: pytest.LogCaptureFixture) -> None:
    srv = await server(lambda n, lines, req: 500 if n < 2 else 204)
    journal, sink = FakeJournal(), v1_sink(srv.url)
    journal.add(*meters(3))
    caplog.set_level(logging.INFO, logger="gateway.sinks")
    await run_until(sink, journal, lambda: journal.cursors.get(sink.cursor) == 3)
    assert [s for _, s, _ in srv.requests] == [500, 500, 204]
    assert len(srv.written) == 3 and journal.advances == [3]
    c = sink.counters
    assert (c["retries"], c["sent_lines"], c["sent_batches"], c["dropped_lines"]) == (2, 3, 1, 0)
    assert c["state"] == "stopped" and "HTTP 500" in c["last_error"] and c["backlog"] == 0
    messages = [r.getMessage() for r in caplog.records]
    assert sum("retrying" in m for m in messages) == 1  # one warning, not one per retry
    assert sum("recovered" in m for m in messages) == 1


async def test_413_splits_the_batch(server: Any) -> None:
    # More than 2 lines are too large, and so is meter 4's line on its own (it can never be sent).
    srv = await server(lambda n, lines, req: 413 if len(lines) > 2 or any("00000000004" in ln for ln in lines) else 204)
    journal, sink = FakeJournal(), v1_sink(srv.url)
    journal.add(*meters(7))
    await run_until(sink, journal, lambda: journal.cursors.get(sink.cursor) == 7)
    assert sorted(srv.written) == sorted(ln for ln in reading_lines(meters(7)) if "000000000004" not in ln)
    assert all(len(lines) <= 2 for _, s, lines in srv.requests if s == 204)
    assert sink.counters["dropped_lines"] == 1 and sink.counters["retries"] == 0


async def test_400_drops_only_the_bad_line(server: Any, caplog: pytest.LogCaptureFixture) -> None:
    srv = await server(lambda n, lines, req: 400 if any("000000000005" in ln for ln in lines) else 204)
    journal, sink = FakeJournal(), v1_sink(srv.url)
    journal.add(*meters(9))
    await run_until(sink, journal, lambda: journal.cursors.get(sink.cursor) == 9)
    good = [ln for ln in reading_lines(meters(9)) if "000000000005" not in ln]
    assert sorted(srv.written) == sorted(good)
    assert sink.counters["dropped_lines"] == 1 and sink.counters["sent_lines"] == 8
    drops = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(drops) == 1 and "000000000005" in drops[0].getMessage() and "HTTP 400" in drops[0].getMessage()


async def test_401_keeps_everything_and_retries_slowly(server: Any) -> None:
    fixed = asyncio.Event()
    srv = await server(lambda n, lines, req: 204 if fixed.is_set() else 401)
    journal, sink = FakeJournal(), v1_sink(srv.url, unauthorized_retry=0.3, username="u", password="wrong")
    journal.add(*meters(2))
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(journal, stop))
    await asyncio.sleep(0.5)
    assert state(sink) == "unauthorized" and journal.advances == []
    assert 1 <= len(srv.requests) <= 3  # slow retries, not a storm
    assert sink.counters["dropped_lines"] == 0
    fixed.set()  # e.g. the password fixed on the server side
    async with asyncio.timeout(3):
        while journal.cursors.get(sink.cursor) != 2:
            await asyncio.sleep(0.01)
    assert state(sink) == "ok"
    stop.set()
    await task
    assert srv.requests[0][2] and len(srv.written) == 2


async def test_429_retry_after_is_honoured(server: Any) -> None:
    srv = await server(lambda n, lines, req: (429, {"Retry-After": "1"}) if n == 0 else 204)
    journal, sink = FakeJournal(), v1_sink(srv.url)
    journal.add(*meters(1))
    await run_until(sink, journal, lambda: journal.cursors.get(sink.cursor) == 1)
    (t1, s1, _), (t2, s2, _) = srv.requests
    assert (s1, s2) == (429, 204) and t2 - t1 >= 0.95


async def test_connection_refused_keeps_the_cursor_and_stop_is_prompt(free_port: int) -> None:
    journal, sink = FakeJournal(), v1_sink(f"http://127.0.0.1:{free_port}", retry_initial=0.05, retry_max=5.0)
    journal.add(*meters(2))
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(journal, stop))
    await asyncio.sleep(0.4)
    assert state(sink) == "retrying" and sink.counters["retries"] >= 2
    assert journal.advances == [] and "ClientConnectorError" in sink.counters["last_error"]
    started = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, 1)
    assert time.monotonic() - started < 0.5 and state(sink) == "stopped"


async def test_batches_by_size_and_rounds_forwarded(server: Any) -> None:
    srv = await server(lambda n, lines, req: 204)
    journal, sink = FakeJournal(), v1_sink(srv.url, batch_lines=3, gzip=False)
    journal.add(*meters(7))
    journal.add_round(RoundStats(plan="p15", round_id="r1", started=T0, station="north", expected=7, collected=7))
    await run_until(sink, journal, lambda: journal.cursors.get(sink.cursor) == 7 and bool(journal.round_cursors))
    assert journal.advances == [3, 6, 7] and journal.round_cursors[sink.cursor] == 8
    assert [len(lines) for _, _, lines in srv.requests] == [1, 3, 3, 1]  # the round first, then readings
    assert srv.requests[0][2][0].startswith("collection,plan=p15,reread=0,station=north ")


async def test_an_idle_sink_polls_once_per_flush_interval(server: Any) -> None:
    srv = await server(lambda n, lines, req: 204)
    journal, sink = FakeJournal(), v1_sink(srv.url, flush_interval=0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(journal, stop))
    await asyncio.sleep(0.55)
    journal.add(*meters(1))  # picked up within one flush interval
    await asyncio.sleep(0.15)
    stop.set()
    await task
    assert 5 <= journal.reads <= 9 and len(srv.written) == 1 and srv.requests


async def test_v1_request_shape(server: Any) -> None:
    seen: list[web.Request] = []

    def script(n: int, lines: list[str], req: web.Request) -> int:
        seen.append(req)
        return 204

    srv = await server(script)
    journal, sink = FakeJournal(), v1_sink(srv.url, retention_policy="one_year", username="me", password="pw")
    journal.add(*meters(1))
    await run_until(sink, journal, lambda: bool(journal.advances))
    req = seen[0]
    assert req.path == "/write" and dict(req.query) == {"db": "meters", "rp": "one_year", "precision": "s"}
    assert req.headers["Content-Encoding"] == "gzip" and req.headers["Authorization"].startswith("Basic ")


async def test_v2_maps_client_errors_and_rereads_the_token_file(server: Any, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("old\n")

    authorized: list[int] = []

    def script(n: int, lines: list[str], req: web.Request) -> tuple[int, dict[str, str]] | int:
        if req.headers.get("Authorization") != "Token new":
            return 401
        authorized.append(n)
        if len(authorized) <= 2:
            return 503, {"Retry-After": "0"}
        return 400 if any("000000000001" in ln for ln in lines) else 204

    srv = await server(script)
    config = InfluxSinkConfig(name="vm", url=srv.url, bucket="b", org="o", token_file=token_file,
                              retry_initial=0.02, retry_max=0.1, unauthorized_retry=0.2)
    journal, sink = FakeJournal(), InfluxSink(config)
    journal.add(*meters(3))
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(journal, stop))
    await asyncio.sleep(0.3)
    assert state(sink) == "unauthorized" and journal.advances == []
    token_file.write_text("new\n")
    async with asyncio.timeout(3):
        while journal.cursors.get(sink.cursor) != 3:
            await asyncio.sleep(0.01)
    stop.set()
    await task
    assert [s for _, s, _ in srv.requests if s != 401][:2] == [503, 503]
    assert sink.counters["dropped_lines"] == 1 and len(srv.written) == 2
    assert srv.requests[-1][2] and state(sink) == "stopped"


class Flaky(InfluxSink):
    """Raises a non-WriteFailure once: a library surprise."""

    calls = 0

    async def send(self, units: list[str]) -> None:
        self.calls += 1
        if self.calls == 1:
            raise KeyError("surprise")
        await super().send(units)


async def test_an_unexpected_error_is_retried_not_lost(server: Any) -> None:
    srv = await server(lambda n, lines, req: 204)
    journal = FakeJournal()
    sink = Flaky(InfluxSinkConfig.model_validate({"name": "f", "url": srv.url, "api": "v1", "database": "m",
                                                  "retry_initial": 0.02}))
    journal.add(*meters(2))
    await run_until(sink, journal, lambda: journal.cursors.get(sink.cursor) == 2)
    assert len(srv.written) == 2 and sink.counters["retries"] == 1 and "KeyError" in sink.counters["last_error"]


# --- config ---------------------------------------------------------------------------------------------
def test_config_validation() -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(SinkConfig)
    v1 = adapter.validate_python({"kind": "influxdb", "name": "db", "api": "v1", "url": "http://127.0.0.1:8086/",
                                  "database": "m"})
    assert isinstance(v1, InfluxSinkConfig) and v1.url == "http://127.0.0.1:8086" and v1.batch_lines == 5000
    mq = adapter.validate_python({"kind": "mqtt", "name": "north", "url": "mqtt://u:p%40ss@127.0.0.1:1884",
                                  "station": "st1"})
    assert isinstance(mq, MqttSinkConfig) and (mq.host, mq.port, mq.credentials) == ("127.0.0.1", 1884, ("u", "p@ss"))
    bad = [
        {"kind": "influxdb", "name": "db", "api": "v1", "url": "http://h"},  # no database
        {"kind": "influxdb", "name": "db", "api": "v2", "url": "http://h", "bucket": "b", "database": "m"},
        {"kind": "influxdb", "name": "db", "url": "http://h", "bucket": "b", "token": "t", "token_file": "/x"},
        {"kind": "influxdb", "name": "db", "url": "http://h", "bucket": "b", "batch_size": 5},  # unknown key
        {"kind": "influxdb", "name": "db", "url": "ftp://h", "bucket": "b"},
        {"kind": "mqtt", "name": "m", "url": "mqtt://h", "station": "a/b"},
        {"kind": "mqtt", "name": "m", "url": "http://h", "station": "a"},
        {"kind": "kafka", "name": "k"},
    ]
    for raw in bad:
        with pytest.raises(ValidationError):
            adapter.validate_python(raw)


async def test_build_sink_takes_the_daemons_station_for_mqtt() -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(SinkConfig)
    mqtt = build_sink(adapter.validate_python({"kind": "mqtt", "name": "up", "url": "mqtt://127.0.0.1"}), "North 1")
    assert isinstance(mqtt, MqttSink) and mqtt.topic("status") == "meterd/North_1/status"
    assert mqtt.client_id == "meterd-North_1-up" and mqtt.cursor == "sink:up"
    influx = build_sink(adapter.validate_python({"kind": "influxdb", "name": "db", "url": "http://127.0.0.1:1",
                                                 "bucket": "b"}), "North 1")
    assert isinstance(influx, InfluxSink) and influx.config.batch_lines == 5000 and influx.config.gzip
    with pytest.raises(ValueError, match="no station"):
        build_sink(adapter.validate_python({"kind": "mqtt", "name": "up", "url": "mqtt://127.0.0.1"}))


# --- MQTT payloads ----------------------------------------------------------------------------------------
async def test_mqtt_messages_one_per_meter_per_batch() -> None:
    sink = MqttSink(MqttSinkConfig.model_validate({"name": "north", "url": "mqtt://127.0.0.1", "station": "st1",
                                                   "topic_prefix": "grid"}))
    msgs = sink.encode_readings([reading(value=1.5), reading(meter="000000000002", value=2.0),
                                 reading(quantity="voltage_a", value=float("nan"), unit="V", quality=Quality.INVALID),
                                 reading(quantity="trip_count", value=3, unit="", frozen=True)])
    assert [m.topic for m in msgs] == ["grid/st1/meters/000000000001/readings", "grid/st1/meters/000000000002/readings"]
    first = json.loads(msgs[0].payload)
    assert first[0] == {"quantity": "forward_active_energy", "value": 1.5, "unit": "kWh",
                        "time": "2023-11-14T22:13:20+00:00", "frozen": False, "quality": "good"}
    assert first[1]["value"] is None and first[1]["quality"] == "invalid"
    assert first[2]["value"] == 3 and first[2]["frozen"] is True
    stats = RoundStats(plan="daily", round_id="r", started=T0, station="st1", expected=2, collected=1,
                       failed={Reason.NO_REPLY: 1}, finished=T0 + 3)
    (msg,) = sink.encode_rounds([stats])
    assert msg.topic == "grid/st1/collection" and not msg.retain
    assert json.loads(msg.payload) == round_payload(stats)
    assert round_payload(stats)["failed"] == {"no_reply": 1} and round_payload(stats)["success_ratio"] == 0.5
