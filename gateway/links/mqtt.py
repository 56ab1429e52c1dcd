"""Raw frames over an MQTT topic pair (a 4G DTU in transparent MQTT mode, concentrators.md §3.3).

`send` publishes one frame on the request topic (QoS 1, binary or hex
text); `receive` returns the next message from the response topic (hex
decoded). Messages that arrive while nobody waits are queued (bounded; the
oldest is dropped and counted when full). The broker session is kept with
backoff; the subscription is made again on every connect.

aiomqtt (>=2.5,<3) is used only here, so its v3 API change stays a local one.
"""

from __future__ import annotations

import asyncio
import binascii
import urllib.parse
from typing import ClassVar

import aiomqtt

from gateway.links.base import INBOX_ITEMS, RECONNECT_MAX, RECONNECT_MIN, Link, LinkDown

ENCODINGS = ("binary", "hex")
PUBLISH_TIMEOUT = 5.0  # s to wait for the broker's PUBACK
BROKER_TIMEOUT = 10.0  # s for connect / subscribe / disconnect
KEEPALIVE = 30  # s between MQTT pings


class MqttLink(Link):
    kind: ClassVar[str] = "mqtt"
    message_pipe: ClassVar[bool] = True
    connection_errors: ClassVar[tuple[type[BaseException], ...]] = (OSError, EOFError, aiomqtt.MqttError)

    def __init__(self, name: str, url: str, request_topic: str, response_topic: str, *, encoding: str = "binary",
                 client_id: str | None = None, queue: int = INBOX_ITEMS, reconnect_min: float = RECONNECT_MIN,
                 reconnect_max: float = RECONNECT_MAX) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "mqtt" or not parts.hostname:
            raise ValueError(f"expected mqtt://[USER:PASS@]HOST[:PORT], got {url!r}")
        if not request_topic or "+" in request_topic or "#" in request_topic:
            raise ValueError(f"the request topic must be a plain topic, got {request_topic!r}")
        super().__init__(name, reconnect_min=reconnect_min, reconnect_max=reconnect_max, inbox_items=queue)
        self.host = parts.hostname
        self.port = parts.port or 1883
        self.username = urllib.parse.unquote(parts.username) if parts.username else None
        self.password = urllib.parse.unquote(parts.password) if parts.password else None
        self.url = f"mqtt://{self.host}:{self.port}"  # without credentials: it goes into logs
        self.request_topic = request_topic
        self.response_topic = response_topic
        self.encoding = encoding
        self.client_id = client_id
        self._client: aiomqtt.Client | None = None

    async def run(self, stop: asyncio.Event) -> None:
        await self._keep_connected(stop, self._session)

    async def _session(self) -> str:
        client = aiomqtt.Client(self.host, self.port, username=self.username, password=self.password,
                                identifier=self.client_id, keepalive=KEEPALIVE, timeout=BROKER_TIMEOUT)
        async with client:
            await client.subscribe(self.response_topic, qos=1)
            self._client = client
            try:
                self._set_up(f"{self.url} {self.request_topic} -> {self.response_topic}")
                async for message in client.messages:
                    self._receive(message.payload)
            finally:
                self._client = None
        return "the broker ended the session"

    def _receive(self, payload: object) -> None:
        if isinstance(payload, str):
            payload = payload.encode()
        if not isinstance(payload, bytes | bytearray):
            self.stats["bad_payloads"] += 1
            return
        data = bytes(payload)
        if self.encoding == "hex":
            try:
                data = bytes.fromhex("".join(data.decode("ascii").split()))
            except (UnicodeDecodeError, ValueError, binascii.Error):
                self.stats["bad_payloads"] += 1
                return
        self.stats["messages_in"] += 1
        self._feed(data)

    async def _transmit(self, data: bytes) -> None:
        client = self._client
        if client is None:
            raise LinkDown(f"{self.name}: {self.detail}")
        payload = data.hex().upper().encode() if self.encoding == "hex" else data
        try:
            await client.publish(self.request_topic, payload, qos=1, timeout=PUBLISH_TIMEOUT)
        except aiomqtt.MqttError as exc:
            self.stats["send_failures"] += 1
            raise LinkDown(f"{self.name}: publish failed: {exc}") from exc
        self.stats["messages_out"] += 1
