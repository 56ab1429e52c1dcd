"""The MQTT northbound sink: readings and round statistics as JSON (aiomqtt >=2.5,<3 lives here only).

Topics (`P` = topic_prefix, `S` = station):
- `P/S/meters/<address>/readings`: one message per meter per batch, a JSON list of
  `{"quantity", "value", "unit", "time" (ISO 8601, UTC), "frozen", "quality"}`;
- `P/S/collection`: one message per round (`round_payload`);
- `P/S/commands/<id>` (retained): every state change of a control command, its JSON as the API
  shows it plus `time` and `seq` (sinks/control.py); the topic holds the command's latest state;
- `P/S/status` (retained): `{"state": "online", ...}` on every connect; the last will
  (retained) and a clean stop say `{"state": "offline", ...}`.

QoS 1 by default: aiomqtt's `publish` returns only after the broker's PUBACK, so the cursor
moves only after the broker has every message of the batch. A connection task keeps the
client connected (capped backoff with jitter) and wakes the run loop when the link is back,
so a batch that failed while the broker was away is re-published at once from the cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import math
import urllib.parse
from dataclasses import dataclass
from typing import Any, Literal

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from pydantic import Field, field_validator

from gateway.model import Reading, RoundStats
from gateway.sinks.base import Sink, SinkSettings, WriteFailure, backoff
from gateway.sinks.control import BadEvent, encode_each
from gateway.sinks.lineproto import round_fields

log = logging.getLogger(__name__)

WINDOW = 100  # QoS>0 publishes in flight at once (paho's inflight window and aiomqtt's warning threshold)
_TOPIC_LEVEL = r"^[^/+#\s]+$"
_NOT_AUTHORIZED = (4, 5, 134, 135)  # CONNACK (3.1.1 codes and paho's ReasonCodes): bad credentials, not authorized


class MqttSinkConfig(SinkSettings):
    """`[[sinks]] kind = "mqtt"`."""

    kind: Literal["mqtt"] = "mqtt"
    url: str = Field(pattern=r"^mqtt://")  # mqtt://[user:pass@]host[:port]
    topic_prefix: str = Field(default="meterd", pattern=r"^[^+#\s]+$")
    station: str | None = Field(default=None, pattern=_TOPIC_LEVEL)  # default: the daemon's station
    qos: Literal[0, 1, 2] = 1
    client_id: str | None = None
    timeout: float = Field(default=10.0, gt=0)
    keepalive: int = Field(default=30, ge=5)

    @field_validator("url")
    @classmethod
    def _parsable(cls, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        if not parts.hostname:
            raise ValueError("url needs a host: mqtt://[user:pass@]host[:port]")
        _ = parts.port  # raises ValueError for a bad port
        return url

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urllib.parse.urlsplit(self.url).port or 1883

    @property
    def credentials(self) -> tuple[str | None, str | None]:
        parts = urllib.parse.urlsplit(self.url)
        unquote = urllib.parse.unquote
        return (unquote(parts.username) if parts.username else None,
                unquote(parts.password) if parts.password else None)


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    retain: bool = False


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC).isoformat()


def _json_value(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    return value


def reading_payload(reading: Reading) -> dict[str, Any]:
    return {"quantity": reading.quantity, "value": _json_value(reading.value), "unit": reading.unit,
            "time": _iso(reading.time), "frozen": reading.frozen, "quality": str(reading.quality)}


def round_payload(stats: RoundStats) -> dict[str, Any]:
    fields = {k: v for k, v in round_fields(stats).items() if not k.startswith("failed_")}
    return {"plan": stats.plan, "station": stats.station, "reread": stats.reread,
            "started": _iso(stats.started),
            "finished": _iso(stats.finished) if stats.finished is not None else None,
            **fields, "failed": {str(k): v for k, v in stats.failed.items()}}


def _topic_level(text: str) -> str:
    return "".join("_" if c in "/+#" or c.isspace() else c for c in text) or "_"


class MqttSink(Sink[Message]):
    def __init__(self, config: MqttSinkConfig, station: str = "") -> None:
        super().__init__(config)
        self.config = config
        if not (config.station or station):
            raise ValueError(f"sink {config.name}: no station for the MQTT topics")
        self.station = _topic_level(config.station or station)
        self.client_id = config.client_id or f"meterd-{self.station}-{config.name}"
        self._client: aiomqtt.Client | None = None
        self._connection: asyncio.Task[None] | None = None
        self._tried = asyncio.Event()  # the first connection attempt has ended, one way or the other

    def _status(self, state: str) -> bytes:
        status = {"state": state, "station": self.station, "client_id": self.client_id}
        if state == "online":
            status["since"] = _iso(_now())
        return json.dumps(status).encode()

    def topic(self, *levels: str) -> str:
        return "/".join((self.config.topic_prefix.rstrip("/"), self.station, *levels))

    def encode_readings(self, readings: list[Reading]) -> list[Message]:
        by_meter: dict[str, list[dict[str, Any]]] = {}
        for reading in readings:
            by_meter.setdefault(reading.meter, []).append(reading_payload(reading))
        return [Message(self.topic("meters", _topic_level(meter), "readings"),
                        json.dumps(items, ensure_ascii=False).encode()) for meter, items in by_meter.items()]

    def encode_rounds(self, rounds: list[RoundStats]) -> list[Message]:
        return [Message(self.topic("collection"), json.dumps(round_payload(s), ensure_ascii=False).encode())
                for s in rounds]

    def encode_events(self, events: list[dict[str, Any]]) -> list[Message]:
        return encode_each(events, self._event_message, self.name)

    def _event_message(self, event: dict[str, Any]) -> Message:
        """Retained: a late subscriber to `.../commands/<id>` sees the command's latest state."""
        command_id = event.get("id")
        if not isinstance(command_id, str) or not command_id:
            raise BadEvent(f"event {event.get('seq')} has no command id")
        return Message(self.topic("commands", _topic_level(command_id)),
                       json.dumps(event, ensure_ascii=False, allow_nan=False).encode(), retain=True)

    def describe(self, unit: Message) -> str:
        return f"{unit.topic} {unit.payload[:200]!r}"

    # --- connection ----------------------------------------------------------------------------
    async def open(self) -> None:
        self._connection = asyncio.create_task(self._stay_connected(), name=f"sink {self.name}: mqtt")

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:  # a clean stop: say offline ourselves (a DISCONNECT sends no will)
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(self.topic("status"), self._status("offline"), qos=1,
                                     retain=True, timeout=self.config.timeout)
        if self._connection is not None:
            self._connection.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._connection
            self._connection = None

    def _new_client(self) -> aiomqtt.Client:
        username, password = self.config.credentials
        will = aiomqtt.Will(self.topic("status"), self._status("offline"), qos=1, retain=True)
        client = aiomqtt.Client(self.config.host, self.config.port, username=username, password=password,
                                identifier=self.client_id, will=will, clean_session=True,
                                timeout=self.config.timeout, keepalive=self.config.keepalive,
                                max_inflight_messages=WINDOW)
        client.pending_calls_threshold = WINDOW
        return client

    async def _stay_connected(self) -> None:
        """Connect, announce online, wait for the link to drop, back off, repeat."""
        failures = 0
        while True:
            client = self._new_client()
            refused = False
            try:
                async with client:
                    await client.publish(self.topic("status"), self._status("online"), qos=1, retain=True)
                    self._client, failures = client, 0
                    log.log(logging.DEBUG if self._tried.is_set() else logging.INFO,  # later: "recovered" says it
                            "sink %s: connected to %s:%d", self.name, self.config.host, self.config.port)
                    self.set_ok()
                    self.wake()
                    self._tried.set()
                    async for _ in client.messages:  # nothing is subscribed: this ends only by MqttError
                        pass
            except Exception as exc:  # MqttError, or a paho surprise: either way reconnect
                failures += 1
                refused = isinstance(exc, MqttConnectError) and exc.rc in _NOT_AUTHORIZED
                self.set_failing(f"mqtt {self.config.host}:{self.config.port}: {exc}",
                                 "unauthorized" if refused else "retrying")
            finally:
                self._client = None
                self._tried.set()
            await asyncio.sleep(self.settings.unauthorized_retry if refused else backoff(self.settings, failures))

    async def send(self, units: list[Message]) -> None:
        if not self._tried.is_set():  # just started: let the first connect finish before calling it down
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tried.wait(), self.config.timeout)
        client = self._client
        if client is None:
            raise WriteFailure(f"mqtt {self.config.host}:{self.config.port}: not connected")
        for start in range(0, len(units), WINDOW):
            window = units[start:start + WINDOW]
            results = await asyncio.gather(
                *(client.publish(m.topic, m.payload, qos=self.config.qos, retain=m.retain) for m in window),
                return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise WriteFailure(f"mqtt publish: {errors[0]!r}")


def _now() -> float:
    return dt.datetime.now(tz=dt.UTC).timestamp()
