"""Control commands' audit events through the sinks: the encoding (unit tests), and the real journal's
control stream forwarded to influxd 1.x (/write), VictoriaMetrics (/api/v2/write) and Mosquitto.

Events are made by the real control store (gateway/control/store.py) in a real journal file."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from gateway.control import store
from gateway.control.model import Action, Command, State
from gateway.journal import Journal
from gateway.model import Reading
from gateway.sinks import InfluxSink, InfluxSinkConfig, MqttSink, MqttSinkConfig
from gateway.sinks.control import BadEvent, control_line, public_event
from tests.integration.test_sinks_real import Inbox, influx_rows, retained, wait_for
from tests.services import InfluxDB, Mosquitto, VictoriaMetrics

T0 = 1_700_000_000


def unique_meter() -> str:
    return f"{uuid.uuid4().int % 10**12:012d}"


def event(**changes: Any) -> dict[str, Any]:
    command = Command(id="c-1", request_id="bill-9", meter="000000000001", action=Action.TRIP, state=State.SENT,
                      created=T0, deadline=T0 + 3600, actor="api", reason="balance", updated=T0 + 1.7, attempts=1)
    return {**command.public(), "time": T0 + 1.7, "seq": 3, **changes}


# --- encoding -----------------------------------------------------------------------------------------
def test_a_control_line_has_bounded_tags_and_the_fixed_fields() -> None:
    assert control_line(event(), "north") == (
        'control,action=trip,meter=000000000001,state=sent,station=north command_id="c-1",request_id="bill-9",'
        f'fail_reason="",detail="",attempts=1i,dry_run=false {T0 + 1}')


def test_free_text_is_escaped_and_unknown_states_do_not_make_new_series() -> None:
    line = control_line(event(state="rebooting", action="explode", detail='said "no"\nthen hung',
                              fail_reason="refused", dry_run=True), "north station")
    assert line.startswith("control,action=unknown,meter=000000000001,state=unknown,station=north\\ station ")
    assert 'detail="said \\"no\\"\\nthen hung"' in line and 'fail_reason="refused"' in line
    assert "dry_run=true" in line


@pytest.mark.parametrize(("changes", "says"), [
    ({"time": None, "updated": None}, "no valid time"), ({"time": "yesterday"}, "no valid time"),
    ({"meter": None}, "no meter"), ({"attempts": "2"}, "attempts"),
])
def test_an_event_that_cannot_be_encoded_says_why(changes: dict[str, Any], says: str) -> None:
    with pytest.raises(BadEvent, match=says):
        control_line(event(**changes), "north")


def test_published_events_carry_seq_and_time_and_never_a_secret() -> None:
    raw = {k: v for k, v in event().items() if k not in ("seq", "time")}
    raw |= {"password": "12345678", "operator_code": "0001", "relay": {"open": True}}
    published = public_event(9, raw)
    assert published["seq"] == 9 and published["time"] == raw["updated"]
    assert "password" not in published and "operator_code" not in published and published["relay"] == {"open": True}


def test_mqtt_events_go_retained_to_the_commands_topic() -> None:
    sink = MqttSink(MqttSinkConfig(name="m", url="mqtt://127.0.0.1:1"), "north")
    good, bad = event(), event(id=None)
    (message,) = sink.encode_events([good, bad])
    assert message.topic == "meterd/north/commands/c-1" and message.retain
    assert json.loads(message.payload) == good


# --- the real journal's control stream ------------------------------------------------------------------
class Commands:
    """Commands moved through their states by the real control store, in a real journal."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    async def submit(self, meter: str, action: Action = Action.TRIP) -> Command:
        now = time.time()
        command = Command(id=f"c-{uuid.uuid4().hex[:10]}", request_id=f"r-{uuid.uuid4().hex[:8]}", meter=meter,
                          action=action, state=State.PENDING, created=now, deadline=now + 600, updated=now)
        await self.journal.write(store.submit, command)
        return command

    async def move(self, command: Command, state: State, **changes: Any) -> Command:
        moved = dataclasses.replace(command, state=state, updated=time.time(), **changes)
        assert await self.journal.write(store.transition, moved, command.state)
        return moved

    async def life(self, meter: str) -> Command:
        """pending -> sent -> acknowledged -> verified: four events."""
        command = await self.submit(meter)
        command = await self.move(command, State.SENT, attempts=1)
        command = await self.move(command, State.ACKNOWLEDGED)
        return await self.move(command, State.VERIFIED, detail="relay open")


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    async with Journal(tmp_path / "journal.sqlite") as j:
        yield j


@pytest.fixture
async def commands(journal: Journal) -> Commands:
    await journal.write(store.create)
    return Commands(journal)


@contextlib.asynccontextmanager
async def running(sink: Any, journal: Journal) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(journal, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def forwarded(journal: Journal, sink: Any) -> int:
    return await journal.read(store.events_backlog, sink.cursor)


def influx_sink(influxdb: InfluxDB, db: str, **kw: Any) -> InfluxSink:
    config = InfluxSinkConfig(name=f"i{uuid.uuid4().hex[:6]}", api="v1", url=influxdb.url, database=db,
                              flush_interval=0.05, retry_initial=0.1, retry_max=0.5, timeout=2.0, **kw)
    return InfluxSink(config, "north")


@pytest.mark.integration
async def test_every_state_change_lands_in_influxd_with_fixed_field_types(
        influxdb: InfluxDB, journal: Journal, commands: Commands) -> None:
    db = f"control_{uuid.uuid4().hex[:8]}"
    influxdb.create_database(db)
    meter = unique_meter()
    verified = await commands.life(meter)
    refused = await commands.move(await commands.submit(meter, Action.CLOSE), State.FAILED,
                                  fail_reason="unauthorised", detail="ERR 04")
    sink = influx_sink(influxdb, db)
    async with running(sink, journal):
        await wait_for(lambda: sink.counters["sent_lines"] == 6, what="six events")
    assert await forwarded(journal, sink) == 0 and sink.counters["control_backlog"] == 0

    types = {row["fieldKey"]: row["fieldType"] for row in influx_rows(influxdb, db, "SHOW FIELD KEYS")}
    assert types == {"command_id": "string", "request_id": "string", "fail_reason": "string", "detail": "string",
                     "attempts": "integer", "dry_run": "boolean"}
    rows = influx_rows(influxdb, db, 'SELECT * FROM control GROUP BY "action", "meter", "state", "station"')
    states = sorted((row["action"], row["state"]) for row in rows)
    assert states == [("close", "failed"), ("close", "pending"), ("trip", "acknowledged"), ("trip", "pending"),
                      ("trip", "sent"), ("trip", "verified")]
    assert {row["meter"] for row in rows} == {meter} and {row["station"] for row in rows} == {"north"}
    (failed,) = [row for row in rows if row["state"] == "failed"]
    assert (failed["command_id"], failed["fail_reason"], failed["detail"]) == (refused.id, "unauthorised", "ERR 04")
    (done,) = [row for row in rows if row["state"] == "verified"]
    assert (done["command_id"], done["request_id"], done["attempts"], done["dry_run"]) == \
        (verified.id, verified.request_id, 1, False)

    again = InfluxSink(sink.config, "north")  # a restart resumes from the cursor: nothing is sent twice
    async with running(again, journal):
        await commands.move(await commands.submit(meter, Action.ALARM), State.DRY_RUN, dry_run=True)
        await wait_for(lambda: again.counters["sent_lines"] == 1, what="the new event only")
    assert again.counters["sent_lines"] == 1


@pytest.mark.integration
async def test_events_made_while_influxd_is_down_all_arrive(
        influxdb: InfluxDB, journal: Journal, commands: Commands) -> None:
    db = f"control_{uuid.uuid4().hex[:8]}"
    influxdb.create_database(db)
    meters = [unique_meter() for _ in range(3)]
    sink = influx_sink(influxdb, db)
    async with running(sink, journal):
        with influxdb.stopped():
            for meter in meters:
                await commands.life(meter)
            await wait_for(lambda: sink.counters["retries"] >= 2, what="retries while influxd is down")
            assert await forwarded(journal, sink) == 12  # the cursor did not move
        await wait_for(lambda: sink.counters["sent_lines"] == 12, timeout=20, what="backlog drained")
    counts = influx_rows(influxdb, db, 'SELECT COUNT(command_id) FROM control GROUP BY "meter"')
    assert sorted(row["meter"] for row in counts) == sorted(meters) and {row["count"] for row in counts} == {4}


@pytest.mark.integration
async def test_v2_into_victoriametrics(victoriametrics: VictoriaMetrics, journal: Journal,
                                       commands: Commands) -> None:
    meter = unique_meter()
    await commands.life(meter)
    sink = InfluxSink(InfluxSinkConfig(name="vm", url=victoriametrics.url, org="meterd", bucket="meters",
                                       token=SecretStr("unused"), flush_interval=0.05), "north")
    async with running(sink, journal):
        await wait_for(lambda: sink.counters["sent_lines"] == 4, what="four events")
    series = {(s["metric"]["__name__"], s["metric"]["state"]): s
              for s in victoriametrics.export(f'{{meter="{meter}"}}')}
    attempts = series[("control_attempts", "verified")]
    assert attempts["metric"] | {"__name__": ""} == {"__name__": "", "meter": meter, "station": "north",
                                                    "action": "trip", "state": "verified"}
    assert attempts["values"] == [1]
    assert series[("control_attempts", "pending")]["values"] == [0]
    assert series[("control_dry_run", "verified")]["values"] == [0]
    # VictoriaMetrics has no string values: it keeps the series of the string fields with 0.
    names = {"command_id", "request_id", "fail_reason", "detail", "attempts", "dry_run"}
    assert {name for name, _ in series} == {f"control_{name}" for name in names}


@pytest.mark.integration
async def test_mqtt_shows_each_change_and_keeps_the_latest_state_retained(
        mosquitto: Mosquitto, journal: Journal, commands: Commands) -> None:
    station = f"st{uuid.uuid4().hex[:8]}"
    meter = unique_meter()
    sink = MqttSink(MqttSinkConfig(name="mqtt", url=f"mqtt://{mosquitto.host}:{mosquitto.port}",
                                   flush_interval=0.05), station)
    async with Inbox(mosquitto, f"meterd/{station}/commands").open() as inbox, running(sink, journal):
        command = await commands.life(meter)
        await wait_for(lambda: len(inbox.on(command.id)) == 4, what="four events")
    seen = inbox.on(command.id)
    assert [e["state"] for e in seen] == ["pending", "sent", "acknowledged", "verified"]
    assert [e["seq"] for e in seen] == sorted(e["seq"] for e in seen)
    assert all(e["meter"] == meter and e["id"] == command.id and "time" in e for e in seen)
    assert all("password" not in json.dumps(e) for e in seen)
    latest = await retained(mosquitto, f"meterd/{station}/commands/{command.id}")
    assert latest["state"] == "verified" and latest["terminal"] is True and latest["detail"] == "relay open"


# --- a journal without (good) control tables ---------------------------------------------------------------
@pytest.mark.integration
async def test_without_control_tables_readings_still_flow(influxdb: InfluxDB, journal: Journal) -> None:
    db = f"control_{uuid.uuid4().hex[:8]}"
    influxdb.create_database(db)
    meter = unique_meter()
    await journal.append([voltage(meter, T0)])
    sink = influx_sink(influxdb, db)
    async with running(sink, journal):
        await wait_for(lambda: sink.counters["sent_lines"] == 1, what="the reading")
    assert sink.counters["last_error"] == "" and sink.counters["control_backlog"] == 0
    assert len(influx_rows(influxdb, db, "SELECT voltage_a FROM voltage")) == 1


def _broken_table(conn: Any) -> None:
    conn.execute("CREATE TABLE control_events (seq INTEGER PRIMARY KEY)")


def voltage(meter: str, t: float) -> Reading:
    return Reading(meter=meter, quantity="voltage_a", value=230.0, unit="V", time=t, collected=t, station="north",
                   link="rs485-1")


@pytest.mark.integration
async def test_a_broken_control_table_is_reported_and_does_not_stop_readings(
        influxdb: InfluxDB, journal: Journal, caplog: pytest.LogCaptureFixture) -> None:
    db = f"control_{uuid.uuid4().hex[:8]}"
    influxdb.create_database(db)
    await journal.write(_broken_table)
    meter = unique_meter()
    await journal.append([voltage(meter, T0)])
    sink = influx_sink(influxdb, db)
    with caplog.at_level(logging.DEBUG, logger="gateway.sinks"):
        async with running(sink, journal):
            await wait_for(lambda: sink.counters["sent_lines"] == 1, what="the first reading")
            await journal.append([voltage(meter, T0 + 900)])  # a later pass, over the broken table again
            await wait_for(lambda: sink.counters["sent_lines"] == 2, what="the second reading")
    assert "control events" in sink.counters["last_error"] and "no such column" in sink.counters["last_error"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "control events" in r.message]
    assert len(warnings) == 1  # said once, not at every pass
    assert len(influx_rows(influxdb, db, "SELECT voltage_a FROM voltage")) == 2
