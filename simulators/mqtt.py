"""A bus behind an MQTT topic pair, like a 4G DTU in transparent MQTT mode (concentrators.md §3.3).

Each message on the request topic is one raw frame (binary, or hex text with
optional whitespace); each reply frame the bus sends is published as one
message on the response topic (QoS 1), packed the way a DTU packs serial
bytes (see `simulators.dtu.Packer`): a complete frame at once, damaged or
partial data after a quiet time. Hex replies are upper case without spaces.

The broker may go away at any time: the exposure reconnects with capped
exponential backoff and subscribes again. The `link_drop` fault ends the
broker session (the next one starts after the backoff delay). Counts
`mqtt_connects`, `mqtt_disconnects`, `mqtt_connect_failures`, `mqtt_drops`,
`mqtt_bad_payloads` and `mqtt_outbox_overflow` in `bus.truth`.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import urllib.parse

import aiomqtt

from simulators.bus import Bus, Connection
from simulators.packing import Backoff, Packer

log = logging.getLogger(__name__)

ENCODINGS = ("binary", "hex")
OUTBOX = 1000  # replies waiting for the broker; more are dropped and counted


class _MqttPort:
    """The bus's Port for one broker session: packs reply chunks into messages for the outbox."""

    def __init__(self, exposure: MqttExposure, outbox: asyncio.Queue[bytes]) -> None:
        self.exposure = exposure
        self.outbox = outbox
        self.packer = Packer(exposure.bus, self._packet)

    def _packet(self, data: bytes) -> None:
        payload = data.hex().upper().encode() if self.exposure.encoding == "hex" else data
        try:
            self.outbox.put_nowait(payload)
        except asyncio.QueueFull:
            self.exposure.bus.truth["mqtt_outbox_overflow"] += 1

    def write(self, data: bytes) -> None:
        self.packer.write(data)

    def drop(self) -> None:
        self.exposure.drop_session()


class MqttExposure:
    kind = "mqtt"

    def __init__(self, bus: Bus, url: str, *, request_topic: str, response_topic: str, encoding: str,
                 client_id: str | None, reconnect_min: float, reconnect_max: float) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "mqtt" or not parts.hostname:
            raise ValueError(f"expected mqtt://HOST[:PORT], got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 1883
        self.username = urllib.parse.unquote(parts.username) if parts.username else None
        self.password = urllib.parse.unquote(parts.password) if parts.password else None
        self.bus = bus
        self.url = url
        self.request_topic = request_topic
        self.response_topic = response_topic
        self.encoding = encoding
        self.client_id = client_id
        self.where = f"{url} {request_topic} -> {response_topic}"
        self.backoff = Backoff(reconnect_min, reconnect_max)
        self.online = asyncio.Event()  # set while subscribed to the request topic
        self._session: asyncio.Task[None] | None = None
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"mqtt-{bus.name}")

    def drop_session(self) -> None:
        """End the current broker session now (link-drop fault); the supervisor reconnects."""
        if self._session is not None and not self._session.done():
            self.bus.truth["mqtt_drops"] += 1
            self._session.cancel()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        truth = self.bus.truth
        while True:
            since = loop.time()
            session = self._session = loop.create_task(self._serve())
            try:
                await asyncio.wait({session})
            finally:  # also when we are closed: never leave the session behind
                if not session.done():
                    session.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await session
            was_online = self.online.is_set()
            self.online.clear()
            if was_online:
                truth["mqtt_disconnects"] += 1
            if not session.cancelled():
                error = session.exception()
                if not was_online:
                    truth["mqtt_connect_failures"] += 1
                if isinstance(error, aiomqtt.MqttError):  # say it once per outage, not once per retry
                    level = logging.INFO if was_online or self.backoff.failures == 0 else logging.DEBUG
                    log.log(level, "mqtt %s: %s", self.where, error)
                elif error is not None:
                    truth["mqtt_errors"] += 1
                    log.error("mqtt %s: session failed", self.where, exc_info=error)
            if loop.time() - since >= self.backoff.cap:  # the session lived: start over at the minimum
                self.backoff.reset()
            await asyncio.sleep(self.backoff.next())

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue[bytes] = asyncio.Queue(OUTBOX)
        port = _MqttPort(self, outbox)
        async with aiomqtt.Client(self.host, self.port, identifier=self.client_id, username=self.username,
                                  password=self.password) as client:
            await client.subscribe(self.request_topic, qos=1)
            conn = self.bus.attach(port)
            self.online.set()
            self.bus.truth["mqtt_connects"] += 1
            tasks = {loop.create_task(self._receive(client, conn)), loop.create_task(self._publish(client, outbox))}
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # re-raise what ended the session
            finally:
                conn.close()
                port.packer.close()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _receive(self, client: aiomqtt.Client, conn: Connection) -> None:
        async for message in client.messages:
            frame = self._decode(message.payload)
            if frame is None:
                self.bus.truth["mqtt_bad_payloads"] += 1
                continue
            conn.feed_message(frame)

    async def _publish(self, client: aiomqtt.Client, outbox: asyncio.Queue[bytes]) -> None:
        while True:
            payload = await outbox.get()
            await client.publish(self.response_topic, payload, qos=1)

    def _decode(self, payload: object) -> bytes | None:
        if isinstance(payload, str):
            payload = payload.encode()
        if not isinstance(payload, bytes | bytearray):
            return None
        if self.encoding == "binary":
            return bytes(payload)
        try:
            return bytes.fromhex("".join(payload.decode("ascii").split()))
        except (UnicodeDecodeError, ValueError, binascii.Error):
            return None


async def serve_mqtt(bus: Bus, url: str, *, request_topic: str, response_topic: str, encoding: str = "binary",
                     client_id: str | None = None, reconnect_min: float = 1.0,
                     reconnect_max: float = 30.0) -> MqttExposure:
    """Serve the bus on an MQTT topic pair at `url` (mqtt://[USER:PASS@]HOST[:PORT]).

    Returns at once and keeps (re)connecting until closed; `.online` is set
    while the exposure is subscribed. Raises ValueError for a bad url or
    encoding ("binary" or "hex").
    """
    return MqttExposure(bus, url, request_topic=request_topic, response_topic=response_topic, encoding=encoding,
                        client_id=client_id, reconnect_min=reconnect_min, reconnect_max=reconnect_max)
