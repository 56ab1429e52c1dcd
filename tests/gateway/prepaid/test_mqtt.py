"""Payments over MQTT through a real Mosquitto and gateway.control's inbox, into the prepaid policy and
the real control engine on a metersim meter: a payment for a tripped meter closes its relay, a
redelivered payment counts once, a bad one is answered on `<topic>/rejected`."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiomqtt
import pytest

from gateway.control.inbox import Inbox, InboxConfig
from gateway.prepaid import Settings
from gateway.prepaid.routes import payment_handler
from tests.gateway.prepaid.station import M, Station, holds, until, verified

pytestmark = pytest.mark.integration


@pytest.fixture
async def station(tmp_path, free_port):
    async with Station(tmp_path, free_port) as s:
        yield s


async def test_a_payment_over_mqtt_restores_a_tripped_meter_once(station, mosquitto):
    name = f"st{uuid.uuid4().hex[:8]}"
    inbox = Inbox(InboxConfig(url=f"mqtt://{mosquitto.host}:{mosquitto.port}", client_id=f"inbox-{name}",
                              reconnect_min=0.05, reconnect_max=0.2), name)
    inbox.route("accounts/+/payments", payment_handler(station.prepaid))
    await station.prepaid.upsert_account(M, Settings(price=0))
    await station.prepaid.set_balance(M, "-5", "bill-1")
    await verified(station, f"prepaid:{M}:1:trip")
    assert station.meter.relay.is_open

    topic = f"meterd/{name}/accounts/{M}/payments"
    answers: list[tuple[str, dict]] = []
    stop = asyncio.Event()
    task = asyncio.create_task(inbox.run(stop))
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier=f"billing-{name}") as client:
        await client.subscribe(f"{topic}/+", qos=1)
        listen = asyncio.create_task(collect(client, answers))
        await asyncio.wait_for(inbox.connected.wait(), 10)
        payment = json.dumps({"amount": "30", "payment_id": "wx-20240501-1"}).encode()
        await client.publish(topic, payment, qos=1)
        await verified(station, f"prepaid:{M}:2:close")
        assert not station.meter.relay.is_open
        await client.publish(topic, payment, qos=1)  # the billing system sends it again
        await client.publish(topic, json.dumps({"amount": "0.001", "payment_id": "wx-2"}).encode(), qos=1)
        await until(lambda: holds(len(answers) == 3), "three answers")
        listen.cancel()
    stop.set()
    await asyncio.wait_for(task, 10)

    (t1, first), (t2, again), (t3, bad) = answers
    assert t1 == f"{topic}/accepted" and first["outcome"] == "applied" and first["estimated_balance"] == "25.00"
    assert [a["action"] for a in first["actions"]] == ["close", "alarm_release"]
    assert t2 == f"{topic}/accepted" and again["outcome"] == "duplicate"
    assert t3 == f"{topic}/rejected" and bad["kind"] == "bad_payment" and "fractions of a fen" in bad["error"]
    assert station.frames() == 4  # alarm, trip, close, alarm_release: the redelivery sent nothing
    assert station.prepaid.account(M)["estimated_balance"] == "25.00"


async def collect(client: aiomqtt.Client, answers: list[tuple[str, dict]]) -> None:
    async for message in client.messages:
        assert isinstance(message.payload, bytes)
        answers.append((str(message.topic), json.loads(message.payload)))
