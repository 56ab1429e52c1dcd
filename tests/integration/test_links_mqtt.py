"""MqttLink against a real Mosquitto and the simulator's MQTT exposure (a DTU in transparent MQTT mode)."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from gateway.links import LinkDown, MqttLink
from protocols.dlt645 import Accept, Frame, Framer, decode, read_request
from simulators.mqtt import serve_mqtt
from tests.gateway.test_links import ENERGY, FAST, ask, eventually, make_bus, recorder, running

pytestmark = pytest.mark.integration


def url(mosquitto) -> str:
    return f"mqtt://{mosquitto.host}:{mosquitto.port}"


@pytest.mark.parametrize("encoding", ["binary", "hex"])
async def test_mqtt_link_reads_meters(mosquitto, unique_topic, encoding):
    bus = make_bus()
    req, resp = f"{unique_topic}/req", f"{unique_topic}/resp"
    exposure = await serve_mqtt(bus, url(mosquitto), request_topic=req, response_topic=resp, encoding=encoding)
    link = MqttLink("m", url(mosquitto), req, resp, encoding=encoding, **FAST)
    try:
        async with running(link):
            assert await link.wait_up(5.0)
            await asyncio.wait_for(exposure.online.wait(), 5.0)
            await ask(link, "000000000001")
            link.discard_input()
            await link.send(read_request("000000000002", ENERGY))
            message = await link.receive(5.0)  # one message is one whole frame, hex already decoded
            events = Framer(Accept.REPLIES).feed(message)
            assert len(events) == 1 and isinstance(events[0], Frame) and decode(events[0]).address == "000000000002"
        assert link.stats["messages_out"] == 2 and link.stats["messages_in"] == 2
    finally:
        await exposure.close()
        await bus.close()


async def test_mqtt_link_survives_a_broker_restart(mosquitto, unique_topic):
    bus = make_bus()
    req, resp = f"{unique_topic}/req", f"{unique_topic}/resp"
    exposure = await serve_mqtt(bus, url(mosquitto), request_topic=req, response_topic=resp,
                                reconnect_min=0.1, reconnect_max=0.5)
    link = MqttLink("m", url(mosquitto), req, resp, **FAST)
    states = recorder(link)
    try:
        async with running(link):
            assert await link.wait_up(5.0)
            await asyncio.wait_for(exposure.online.wait(), 5.0)
            await ask(link, "000000000001")
            with mosquitto.stopped():
                await eventually(lambda: not link.up)
                with pytest.raises(LinkDown):
                    await link.send(read_request("000000000001", ENERGY))
                await eventually(lambda: link.stats["connect_failures"] >= 1)
            assert await link.wait_up(10.0)
            await asyncio.wait_for(exposure.online.wait(), 10.0)
            await ask(link, "000000000002", timeout=5.0)
        assert [s[1] for s in states] == [True, False, True, False]
        assert link.stats["connects"] == 2 and link.stats["disconnects"] == 1
    finally:
        await exposure.close()
        await bus.close()


async def test_unread_messages_are_bounded_and_bad_payloads_counted(mosquitto, unique_topic):
    req, resp = f"{unique_topic}/req", f"{unique_topic}/resp"
    link = MqttLink("m", url(mosquitto), req, resp, encoding="hex", queue=4, **FAST)
    async with running(link):
        assert await link.wait_up(5.0)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
            await client.publish(resp, b"not hex", qos=1)
            for i in range(10):
                await client.publish(resp, f"68 {i:02X} 16".encode(), qos=1)
        await eventually(lambda: link.stats["messages_in"] == 10)
        assert link.stats["bad_payloads"] == 1 and link.stats["overflow"] == 6
        assert await link.receive(1.0) == bytes([0x68, 6, 0x16])  # the oldest were dropped
        assert link.discard_input() == 9
        with pytest.raises(TimeoutError):
            await link.receive(0.2)
