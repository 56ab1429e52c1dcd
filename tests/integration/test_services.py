"""Smoke tests for the real servers started by tests/services.py."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid

import aiomqtt
import pytest

from tests.server_process import LOOPBACK, free_tcp_ports, http_request
from tests.services import InfluxDB, Mosquitto, VictoriaMetrics

pytestmark = pytest.mark.integration


async def _round_trip(broker: Mosquitto, topic: str, payload: bytes) -> bytes:
    async with (
        aiomqtt.Client(broker.host, broker.port, identifier=f"sub-{uuid.uuid4().hex}") as sub,
        aiomqtt.Client(broker.host, broker.port, identifier=f"pub-{uuid.uuid4().hex}") as pub,
    ):
        await sub.subscribe(topic, qos=1)
        await pub.publish(topic, payload, qos=1)
        async with asyncio.timeout(10):
            message = await anext(sub.messages)
    assert str(message.topic) == topic
    assert isinstance(message.payload, bytes)
    return message.payload


async def test_mosquitto_publish_and_receive(mosquitto: Mosquitto, unique_topic: str) -> None:
    payload = b'{"meter":"000000000001","energy_kwh":123.45}'
    assert await _round_trip(mosquitto, unique_topic, payload) == payload


async def test_mosquitto_restart_keeps_port(mosquitto: Mosquitto, unique_topic: str) -> None:
    port = mosquitto.port
    with mosquitto.stopped():
        assert not mosquitto.running
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(mosquitto.host, port, timeout=2):
                pass
    assert mosquitto.is_ready()
    assert mosquitto.port == port
    assert await _round_trip(mosquitto, unique_topic, b"after restart") == b"after restart"


def _influx_values(influx: InfluxDB, db: str, q: str) -> list[list[object]]:
    series = influx.query(q, db=db)["results"][0]["series"]
    assert len(series) == 1
    values: list[list[object]] = series[0]["values"]
    return values


def test_influxdb_write_and_query(influxdb: InfluxDB) -> None:
    db = f"smoke_{uuid.uuid4().hex[:8]}"
    influxdb.create_database(db)
    influxdb.write(
        "energy,meter=000000000001 total_kwh=123.45,valid=true 1700000000\n"
        "energy,meter=000000000002 total_kwh=6.5,valid=false 1700000900\n",
        db=db,
    )
    values = _influx_values(
        influxdb, db, "SELECT total_kwh, valid, meter FROM energy ORDER BY time"
    )
    assert values == [
        ["2023-11-14T22:13:20Z", 123.45, True, "000000000001"],
        ["2023-11-14T22:28:20Z", 6.5, False, "000000000002"],
    ]


def test_influxdb_write_endpoint_rejects_bad_line(influxdb: InfluxDB) -> None:
    db = f"smoke_{uuid.uuid4().hex[:8]}"
    influxdb.create_database(db)
    status, body = http_request(
        "POST", f"{influxdb.url}/write?db={db}&precision=s", b"energy total_kwh= 1700000000"
    )
    assert status == 400, body


def test_influxdb_restart_keeps_data_and_port(influxdb: InfluxDB) -> None:
    db = f"durable_{uuid.uuid4().hex[:8]}"
    influxdb.create_database(db)
    influxdb.write("energy,meter=000000000003 total_kwh=42.25 1700000000", db=db)
    port = influxdb.port
    with influxdb.stopped():
        assert not influxdb.running
        assert not influxdb.is_ready()
    assert influxdb.port == port
    assert influxdb.is_ready()
    values = _influx_values(influxdb, db, "SELECT total_kwh FROM energy")
    assert values == [["2023-11-14T22:13:20Z", 42.25]]
    # Still writable after the restart.
    influxdb.write("energy,meter=000000000003 total_kwh=43.5 1700000900", db=db)
    assert len(_influx_values(influxdb, db, "SELECT total_kwh FROM energy")) == 2


def test_victoriametrics_api_v2_write_and_read(victoriametrics: VictoriaMetrics) -> None:
    meter = uuid.uuid4().hex[:12]
    now = int(time.time())
    status, body = http_request(
        "POST",
        f"{victoriametrics.url}/api/v2/write?org=meterd&bucket=meters&precision=s",
        f"energy,meter={meter} total_kwh=123.45,power_kw=1.5 {now}".encode(),
    )
    assert status == 204, body

    exported = victoriametrics.export(f'{{meter="{meter}"}}')
    by_name = {series["metric"]["__name__"]: series for series in exported}
    assert set(by_name) == {"energy_total_kwh", "energy_power_kw"}
    assert by_name["energy_total_kwh"]["values"] == [123.45]
    assert by_name["energy_total_kwh"]["timestamps"] == [now * 1000]
    assert by_name["energy_power_kw"]["values"] == [1.5]
    # VictoriaMetrics 1.79 ignores org/bucket: no label is added for them.
    assert by_name["energy_total_kwh"]["metric"] == {"__name__": "energy_total_kwh", "meter": meter}

    result = victoriametrics.query(f'energy_total_kwh{{meter="{meter}"}}')["result"]
    assert [float(r["value"][1]) for r in result] == [123.45]


def test_victoriametrics_v1_write_adds_db_label(victoriametrics: VictoriaMetrics) -> None:
    meter = uuid.uuid4().hex[:12]
    victoriametrics.write(f"energy,meter={meter} total_kwh=7.5", path="/write", db="meterd")
    exported = victoriametrics.export(f'{{meter="{meter}"}}')
    assert [s["metric"].get("db") for s in exported] == ["meterd"]
    assert exported[0]["values"] == [7.5]


def test_free_port_is_bindable(free_port: int) -> None:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, free_port))
    assert len(set(free_tcp_ports(3))) == 3
