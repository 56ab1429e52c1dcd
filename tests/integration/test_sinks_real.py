"""Sinks against real servers: influxd 1.x (/write), VictoriaMetrics (/api/v2/write), Mosquitto.

The journal is the in-memory fake from the unit tests (the real journal is integrated later)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiomqtt
import pytest
from pydantic import SecretStr

from gateway.model import Quality, Reading, Reason, RoundStats
from gateway.sinks import InfluxSink, InfluxSinkConfig, MqttSink, MqttSinkConfig
from tests.gateway.test_sinks import FakeJournal, state
from tests.server_process import LOOPBACK, free_tcp_port
from tests.services import InfluxDB, Mosquitto, VictoriaMetrics

pytestmark = pytest.mark.integration

T0 = 1_700_000_000  # 2023-11-14T22:13:20Z


def unique_meter() -> str:
    return f"{uuid.uuid4().int % 10**12:012d}"


def r(meter: str, quantity: str, value: Any, t: float = T0, **kw: Any) -> Reading:
    return Reading(meter=meter, quantity=quantity, value=value, unit=kw.pop("unit", ""), time=t,
                   collected=t + 2, station="north", link="rs485-1", **kw)


async def wait_for(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(sink: Any, journal: FakeJournal) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(journal, stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


def influx_rows(influx: InfluxDB, db: str, q: str) -> list[dict[str, Any]]:
    result = influx.query(q, db=db)["results"][0]
    rows = []
    for series in result.get("series", []):
        for values in series["values"]:
            rows.append({**series.get("tags", {}), **dict(zip(series["columns"], values, strict=True))})
    return rows


# --- InfluxDB 1.x via /write ----------------------------------------------------------------------------
async def test_v1_values_types_and_timestamps_in_influxd(influxdb: InfluxDB) -> None:
    db = f"sink_{uuid.uuid4().hex[:8]}"
    influxdb.create_database(db)
    m = unique_meter()
    journal = FakeJournal()
    journal.add(
        r(m, "forward_active_energy", 1234.5, unit="kWh"), r(m, "forward_active_energy_t1", 600.0, unit="kWh"),
        r(m, "forward_active_energy", 1200.25, t=T0 - 86400, unit="kWh", frozen=True),
        r(m, "voltage_a", 230.1, unit="V"), r(m, "voltage_b", 0.0, unit="V", quality=Quality.INVALID),
        r(m, "trip_count", 3), r(m, "relay_open", True), r(m, "model", 'DDZY "71"'), r(m, "frequency", None),
    )
    journal.add_round(RoundStats(plan="daily", round_id="d1", started=T0, station="north", expected=2, collected=1,
                                 failed={Reason.NO_REPLY: 1}, finished=T0 + 30))
    sink = InfluxSink(InfluxSinkConfig(name="influx1", api="v1", url=influxdb.url, database=db))
    async with running(sink, journal):
        await wait_for(lambda: journal.cursors.get(sink.cursor) == 9 and bool(journal.round_cursors), what="cursor")
    assert sink.counters["dropped_lines"] == 0 and sink.counters["retries"] == 0

    types = {(row["fieldKey"]): row["fieldType"] for row in influx_rows(influxdb, db, "SHOW FIELD KEYS")}
    assert types == {"forward_active_energy": "float", "forward_active_energy_t1": "float", "voltage_a": "float",
                     "voltage_b_quality": "string", "trip_count": "integer", "relay_open": "boolean",
                     "model": "string", "expected": "integer", "collected": "integer", "skipped": "integer",
                     "success_ratio": "float", "duration": "float", "round_id": "string",
                     **{f"failed_{reason}": "integer" for reason in Reason}}
    energy = influx_rows(influxdb, db, "SELECT * FROM energy ORDER BY time")
    assert energy == [
        {"time": "2023-11-13T22:13:20Z", "forward_active_energy": 1200.25, "forward_active_energy_t1": None,
         "frozen": "true", "link": "rs485-1", "meter": m, "station": "north"},
        {"time": "2023-11-14T22:13:20Z", "forward_active_energy": 1234.5, "forward_active_energy_t1": 600.0,
         "frozen": None, "link": "rs485-1", "meter": m, "station": "north"},
    ]
    voltage = influx_rows(influxdb, db, "SELECT voltage_a, voltage_b_quality FROM voltage")
    assert voltage == [{"time": "2023-11-14T22:13:20Z", "voltage_a": 230.1, "voltage_b_quality": "invalid"}]
    other = influx_rows(influxdb, db, "SELECT model, relay_open FROM other")
    assert other == [{"time": "2023-11-14T22:13:20Z", "model": 'DDZY "71"', "relay_open": True}]
    (event,) = influx_rows(influxdb, db, "SELECT trip_count FROM event")
    assert event["trip_count"] == 3
    (col,) = influx_rows(influxdb, db, 'SELECT * FROM collection GROUP BY "plan", "reread", "station"')
    assert (col["plan"], col["reread"], col["station"]) == ("daily", "0", "north")
    assert (col["expected"], col["failed_no_reply"], col["success_ratio"], col["duration"]) == (2, 1, 0.5, 30.0)


async def test_influxd_down_then_up_loses_and_duplicates_nothing(influxdb: InfluxDB) -> None:
    db = f"sink_{uuid.uuid4().hex[:8]}"
    influxdb.create_database(db)
    meters = [unique_meter() for _ in range(5)]
    journal = FakeJournal()
    config = InfluxSinkConfig(name="influx1", api="v1", url=influxdb.url, database=db, batch_lines=20,
                              retry_initial=0.1, retry_max=0.5, flush_interval=0.1, timeout=2.0)
    sink = InfluxSink(config)

    def add_round(k: int) -> None:  # 5 meters x 2 quantities, one 15-minute slot
        journal.add(*(r(m, q, float(k * 100 + i), t=T0 + 900 * k) for i, m in enumerate(meters)
                      for q in ("forward_active_energy", "reverse_active_energy")))

    async with running(sink, journal):
        for k in range(4):
            add_round(k)
        await wait_for(lambda: journal.cursors.get(sink.cursor) == 40, what="first rounds")
        with influxdb.stopped():
            for k in range(4, 10):
                add_round(k)
            await wait_for(lambda: sink.counters["retries"] >= 2, what="retries while influxd is down")
            assert state(sink) == "retrying"
            assert journal.cursors[sink.cursor] == 40  # nothing acknowledged while the server is down
            assert journal.advances[-1] == 40
        await wait_for(lambda: journal.cursors.get(sink.cursor) == 100, timeout=20, what="backlog drained")
        assert state(sink) == "ok" and sink.counters["backlog"] == 0
    assert journal.advances == sorted(journal.advances)
    rows = influx_rows(influxdb, db, "SELECT forward_active_energy, reverse_active_energy, meter FROM energy")
    assert len(rows) == 50  # 5 meters x 10 slots: every point exactly once
    assert len({(row["meter"], row["time"]) for row in rows}) == 50
    assert all(row["forward_active_energy"] == row["reverse_active_energy"] for row in rows)
    counts = influx_rows(influxdb, db, "SELECT COUNT(forward_active_energy) FROM energy GROUP BY meter")
    assert sorted(row["count"] for row in counts) == [10] * 5


# --- VictoriaMetrics via /api/v2/write (influxdb-client async) -----------------------------------------
async def test_v2_into_victoriametrics(victoriametrics: VictoriaMetrics) -> None:
    m = unique_meter()
    journal = FakeJournal()
    journal.add(r(m, "forward_active_energy", 1234.5, unit="kWh"), r(m, "trip_count", 7),
                r(m, "forward_active_energy", 1240.75, t=T0 + 900, unit="kWh"),
                r(m, "forward_active_energy", 1200.0, t=T0 - 86400, unit="kWh", frozen=True))
    sink = InfluxSink(InfluxSinkConfig(name="vm", url=victoriametrics.url, org="meterd", bucket="meters",
                                       token=SecretStr("unused")))
    async with running(sink, journal):
        await wait_for(lambda: journal.cursors.get(sink.cursor) == 4, what="cursor")
    series = {(s["metric"]["__name__"], s["metric"].get("frozen", "")): s
              for s in victoriametrics.export(f'{{meter="{m}"}}')}
    energy = series[("energy_forward_active_energy", "")]
    assert energy["metric"] | {"__name__": ""} == {"__name__": "", "meter": m, "station": "north", "link": "rs485-1"}
    assert energy["values"] == [1234.5, 1240.75] and energy["timestamps"] == [T0 * 1000, (T0 + 900) * 1000]
    assert series[("energy_forward_active_energy", "true")]["timestamps"] == [(T0 - 86400) * 1000]
    assert series[("event_trip_count", "")]["values"] == [7]


# --- MQTT northbound to Mosquitto ---------------------------------------------------------------------
class Proxy:
    """A TCP relay to the broker that the test can cut (RST both ways) and refuse."""

    def __init__(self, target: Mosquitto) -> None:
        self.target = target
        self.port = free_tcp_port()
        self.server: asyncio.Server | None = None
        self.transports: set[asyncio.WriteTransport] = set()
        self.relays: set[asyncio.Task[Any]] = set()
        self.replies = asyncio.Event()  # cleared: hold everything the broker sends (CONNACK, PUBACK, ...)
        self.replies.set()

    async def listen(self) -> None:
        self.server = await asyncio.start_server(self._relay, LOOPBACK, self.port)

    async def refuse(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    def cut(self) -> None:
        for transport in list(self.transports):
            transport.abort()  # RST, no MQTT DISCONNECT: the broker must send the will

    async def close(self) -> None:
        await self.refuse()
        self.cut()
        await asyncio.gather(*self.relays, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.relays.add(task)
        task.add_done_callback(self.relays.discard)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target.host, self.target.port)
        except OSError:
            writer.transport.abort()
            return
        self.transports |= {writer.transport, up_writer.transport}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if src is up_reader:
                        await self.replies.wait()
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.transports -= {writer.transport, up_writer.transport}


class Inbox:
    """A subscriber on `prefix/#` that keeps (topic, payload, retain) of everything it gets."""

    def __init__(self, broker: Mosquitto, prefix: str) -> None:
        self.broker, self.prefix = broker, prefix
        self.messages: list[tuple[str, Any, bool]] = []

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Inbox]:
        async with aiomqtt.Client(self.broker.host, self.broker.port, identifier=f"inbox-{uuid.uuid4().hex}") as c:
            await c.subscribe(f"{self.prefix}/#", qos=1)
            task = asyncio.create_task(self._collect(c))
            try:
                yield self
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await task

    async def _collect(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            self.messages.append((str(message.topic), json.loads(message.payload), message.retain))

    def on(self, suffix: str) -> list[Any]:
        return [p for t, p, _ in self.messages if t == f"{self.prefix}/{suffix}"]


async def retained(broker: Mosquitto, topic: str) -> Any:
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"probe-{uuid.uuid4().hex}") as c:
        await c.subscribe(topic, qos=1)
        async with asyncio.timeout(5):
            message = await anext(c.messages)
    assert message.retain and isinstance(message.payload, bytes)
    return json.loads(message.payload)


def mqtt_sink(url: str, prefix: str) -> MqttSink:
    return MqttSink(MqttSinkConfig(name="north", url=url, topic_prefix=prefix, station="st1", timeout=3.0,
                                   retry_initial=0.1, retry_max=0.4, flush_interval=0.05))


async def test_mqtt_topics_payloads_and_status(mosquitto: Mosquitto, unique_topic: str) -> None:
    journal = FakeJournal()
    journal.add(r("000000000001", "forward_active_energy", 12.5, unit="kWh"), r("000000000001", "voltage_a", 230.0),
                r("000000000002", "forward_active_energy", 7.25, unit="kWh", frozen=True))
    journal.add_round(RoundStats(plan="p15", round_id="r1", started=T0, station="st1", expected=2, collected=2))
    sink = mqtt_sink(f"mqtt://{mosquitto.host}:{mosquitto.port}", unique_topic)
    async with Inbox(mosquitto, f"{unique_topic}/st1").open() as inbox:
        async with running(sink, journal):
            await wait_for(lambda: journal.cursors.get(sink.cursor) == 3 and bool(journal.round_cursors))
            assert (await retained(mosquitto, f"{unique_topic}/st1/status"))["state"] == "online"
        await wait_for(lambda: len(inbox.on("status")) >= 2, what="status messages")
    (one,) = inbox.on("meters/000000000001/readings")
    assert [(x["quantity"], x["value"], x["time"]) for x in one] == [
        ("forward_active_energy", 12.5, "2023-11-14T22:13:20+00:00"), ("voltage_a", 230.0, "2023-11-14T22:13:20+00:00")]
    (two,) = inbox.on("meters/000000000002/readings")
    assert two[0]["frozen"] is True and two[0]["quality"] == "good"
    (stats,) = inbox.on("collection")
    assert (stats["plan"], stats["expected"], stats["collected"], stats["success_ratio"]) == ("p15", 2, 2, 1.0)
    assert [s["state"] for s in inbox.on("status")] == ["online", "offline"]  # a clean stop says offline itself
    assert (await retained(mosquitto, f"{unique_topic}/st1/status"))["state"] == "offline"
    assert sink.counters["sent_lines"] == 3


async def test_mqtt_last_will_and_republish_after_broker_restart(mosquitto: Mosquitto, unique_topic: str) -> None:
    proxy = Proxy(mosquitto)
    await proxy.listen()
    prefix, journal = f"{unique_topic}/st1", FakeJournal()
    sink = mqtt_sink(f"mqtt://{LOOPBACK}:{proxy.port}", unique_topic)
    status = f"{prefix}/status"
    async with running(sink, journal):
        async with Inbox(mosquitto, prefix).open() as inbox:
            await wait_for(lambda: [s["state"] for s in inbox.on("status")][-1:] == ["online"], what="online")
            # The link dies without an MQTT DISCONNECT: the broker publishes the retained will.
            await proxy.refuse()
            proxy.cut()
            await wait_for(lambda: [s["state"] for s in inbox.on("status")][-1:] == ["offline"], what="last will")
            assert (await retained(mosquitto, status))["state"] == "offline"
            await proxy.listen()
            await wait_for(lambda: [s["state"] for s in inbox.on("status")][-1:] == ["online"], what="reconnect")
            journal.add(r("000000000001", "forward_active_energy", 1.0))
            await wait_for(lambda: len(inbox.on("meters/000000000001/readings")) == 1, what="batch 1")
        assert journal.cursors[sink.cursor] == 1
        await proxy.refuse()
        with mosquitto.stopped():  # the broker goes away with the sink's connection
            journal.add(r("000000000001", "forward_active_energy", 2.0, t=T0 + 900),
                        r("000000000002", "forward_active_energy", 3.0, t=T0 + 900))
            await wait_for(lambda: state(sink) == "retrying" and sink.counters["retries"] >= 1)
            assert journal.cursors[sink.cursor] == 1  # not acknowledged: nothing advanced
        async with Inbox(mosquitto, prefix).open() as inbox:
            await proxy.listen()  # let the sink back in only once the subscriber is listening
            await wait_for(lambda: len(inbox.on("meters/000000000002/readings")) == 1, what="re-published batch")
            await wait_for(lambda: journal.cursors[sink.cursor] == 3, what="cursor after re-publish")
            assert [x["value"] for x in inbox.on("meters/000000000001/readings")[0]] == [2.0]
            assert inbox.on("status")[0]["state"] == "online"
        assert state(sink) == "ok"
    await proxy.close()


async def test_mqtt_cursor_waits_for_the_pubacks(mosquitto: Mosquitto, unique_topic: str) -> None:
    proxy = Proxy(mosquitto)
    await proxy.listen()
    journal = FakeJournal()
    sink = mqtt_sink(f"mqtt://{LOOPBACK}:{proxy.port}", unique_topic)
    async with running(sink, journal), Inbox(mosquitto, f"{unique_topic}/st1").open() as inbox:
        await wait_for(lambda: [s["state"] for s in inbox.on("status")][-1:] == ["online"], what="online")
        proxy.replies.clear()  # the broker gets the PUBLISHes, the sink never sees the PUBACKs
        journal.add(r("000000000001", "forward_active_energy", 1.0), r("000000000002", "forward_active_energy", 2.0))
        await wait_for(lambda: len(inbox.on("meters/000000000002/readings")) == 1, what="published")
        await asyncio.sleep(0.3)
        assert journal.advances == []  # delivered but not acknowledged: the cursor stays
        proxy.replies.set()
        await wait_for(lambda: journal.cursors.get(sink.cursor) == 2, what="cursor after PUBACK")
        assert sink.counters["retries"] == 0  # the original publishes completed, nothing resent
    await proxy.close()
