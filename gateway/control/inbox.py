"""Commands and payments that arrive over MQTT: one subscriber, topics routed to async handlers.

Topics are under `<topic_prefix>/<station>/` (default `meterd/<station>/`). `route(pattern,
handler)` registers a pattern such as `meters/+/commands`; a message on a matching topic
calls `handler(levels, payload)` with the levels the `+` wildcards matched (`["000000000001"]`)
and the decoded JSON object. The handler's dict, if any, is published on `<topic>/accepted`.
A message that cannot be used (not JSON, not an object, too large, a handler's BadRequest or
ControlError) is counted per kind (`counters["rejected_<kind>"]`), logged at WARNING the first
time of each kind (DEBUG after), and answered on `<topic>/rejected` with
`{"request_id", "error", "kind"}`. Messages are handled one at a time, in arrival order. A
stale retained message (delivered flagged at subscription) is refused: old intent never runs.

Delivery: QoS 1 subscriptions on a persistent session (clean_session False, a stable client
id `meterd-<station>-inbox` unless `client_id` is set), so the broker keeps the messages sent
while meterd was away (restart, uplink loss) and delivers them when it is back, within the
broker's limits (Mosquitto: `max_queued_messages`, default 1000 per client;
`persistent_client_expiration`; `persistence true` to survive a broker restart). Each message
is acknowledged (PUBACK) only after its handler returned, i.e. after the command is committed
to the journal: a crash before that gets it redelivered, and so does a handler's JournalError
(the session is ended and made again after the backoff; the broker resends what was not
acknowledged). Any other handler exception is a bug: answered as `internal error`, counted,
logged and acknowledged (it would only fail again). Send a `request_id`: a redelivered
command with one is never executed twice. Two meterd processes must not share a client id
(the broker would keep disconnecting one of them).

`command_handler(control)` serves `meters/<address>/commands` with `{action, request_id,
valid_for, reason}` (source and actor "mqtt"). `run(stop)` is the supervised part: it keeps the
session with capped backoff and jitter; the first failure warns, repeats are DEBUG, recovery INFO.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.control.api import BadRequest, Control, check_address, parse_request, submit
from gateway.control.model import ControlError
from gateway.journal_store import JournalError

log = logging.getLogger("gateway.control.inbox")
Route = Callable[[list[str], dict[str, Any]], Awaitable[dict[str, Any] | None]]
COMMANDS = "meters/+/commands"


class InboxConfig(BaseModel):
    """`[control.mqtt]`: the broker the inbound topics are subscribed on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = "mqtt://127.0.0.1:1883"  # mqtt://[user:pass@]host[:port]
    client_id: str = ""  # default meterd-<station>-inbox; keep it stable (the broker keeps its session)
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    topic_prefix: str = Field(default="meterd", pattern=r"^[^+#\s]+$")
    keepalive: int = Field(default=30, ge=5)
    timeout: float = Field(default=10.0, gt=0)  # s for connect, subscribe, publish
    reconnect_min: float = Field(default=1.0, gt=0)
    reconnect_max: float = Field(default=60.0, gt=0)
    max_payload: int = Field(default=65536, ge=256)  # bytes; a larger message is rejected

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "mqtt" or not parts.hostname:
            raise ValueError("url must be mqtt://[user:pass@]host[:port]")
        _ = parts.port  # ValueError for a bad port
        return url


class Rejected(Exception):
    """A handler's refusal of a message; `kind` names it in counters and logs."""

    def __init__(self, message: str, kind: str = "rejected") -> None:
        super().__init__(message)
        self.kind = kind


def topic_level(text: str) -> str:
    """Text usable as one topic level ('/', '+', '#' and spaces become '_')."""
    return "".join("_" if c in "/+#" or c.isspace() else c for c in text) or "_"


def match(pattern: list[str], levels: list[str]) -> list[str] | None:
    """The levels the `+` wildcards matched, or None when the topic does not match."""
    if len(pattern) != len(levels):
        return None
    found = []
    for want, got in zip(pattern, levels, strict=True):
        if want == "+":
            found.append(got)
        elif want != got:
            return None
    return found


def kind_of(exc: Exception) -> str:
    """BadRequest/Rejected carry a kind; a ControlError's is its class name (UnknownMeter -> unknown_meter)."""
    kind = getattr(exc, "kind", None)
    if isinstance(kind, str):
        return kind
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


class Inbox:
    """The MQTT subscriber of one station; register routes, then `run(stop)`."""

    def __init__(self, config: InboxConfig, station: str) -> None:
        self.config = config
        self.station = topic_level(station)
        self.prefix = f"{config.topic_prefix.rstrip('/')}/{self.station}"
        self.client_id = config.client_id or f"meterd-{self.station}-inbox"
        parts = urllib.parse.urlsplit(config.url)
        self.host, self.port = parts.hostname or "", parts.port or 1883
        unquote = urllib.parse.unquote
        self.username = config.username or (unquote(parts.username) if parts.username else None)
        self.password = config.password or (unquote(parts.password) if parts.password else None)
        self.routes: list[tuple[str, list[str], Route]] = []
        self.counters: Counter[str] = Counter()
        self.connected = asyncio.Event()  # set while subscribed
        self._warned: set[str] = set()
        self._failing = False
        self._running = False
        self._session_up = False  # the current session got as far as subscribing

    def route(self, pattern: str, handler: Route) -> None:
        """Serve `<prefix>/<station>/<pattern>` (`+` wildcards only); before `run()`."""
        if self._running:
            raise RuntimeError("register routes before Inbox.run()")
        levels = pattern.strip("/").split("/")
        if not pattern.strip("/") or any(level in ("", "#") or ("+" in level and level != "+") for level in levels):
            raise ValueError(f"route pattern {pattern!r}: plain levels and whole-level '+' only")
        self.routes.append((f"{self.prefix}/{'/'.join(levels)}", levels, handler))

    # --- the session ----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Keep the session and dispatch until `stop` is set."""
        self._running = True
        failures = 0
        while not stop.is_set():
            self._session_up = False
            session = asyncio.create_task(self._session(), name="control inbox")
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({session, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not session.done():
                session.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopping
            try:
                await session
                failures = 0
            except asyncio.CancelledError:
                if not stop.is_set():
                    raise
            except Exception as exc:  # MqttError or a paho surprise: reconnect either way
                failures += 1
                self._trouble(exc)
            if stop.is_set():
                break
            ceiling = min(self.config.reconnect_max, self.config.reconnect_min * 2.0 ** min(max(failures - 1, 0), 30))
            delay = ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - jitter, not crypto
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    def _trouble(self, exc: Exception) -> None:
        self.counters["disconnects" if self._session_up else "connect_failures"] += 1
        level = logging.DEBUG if self._failing else logging.WARNING
        self._failing = True
        log.log(level, "control inbox: mqtt %s:%d: %s (retrying)", self.host, self.port, exc)

    async def _session(self) -> None:
        client = aiomqtt.Client(self.host, self.port, username=self.username, password=self.password,
                                identifier=self.client_id, clean_session=False, keepalive=self.config.keepalive,
                                timeout=self.config.timeout)
        # Acknowledge a message only once its handler has committed it (see the module docs).
        client._client.manual_ack_set(True)  # aiomqtt 2.x has no option for it: its paho client
        try:
            async with client:
                for topic, _, _ in self.routes:
                    await client.subscribe(topic, qos=1)
                self.counters["connects"] += 1
                self._session_up = True
                self.connected.set()
                level = logging.INFO if self._failing or self.counters["connects"] == 1 else logging.DEBUG
                log.log(level, "control inbox: %s to %s:%d as %s, %d route(s)",
                        "recovered, connected" if self._failing else "connected", self.host, self.port,
                        self.client_id, len(self.routes))
                self._failing = False
                async for message in client.messages:
                    await self._dispatch(client, message)
                    if message.qos > 0:
                        client._client.ack(message.mid, message.qos)
        finally:
            self.connected.clear()

    # --- one message ----------------------------------------------------------------------------
    async def _dispatch(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        self.counters["received"] += 1
        payload: dict[str, Any] | None = None
        relative = topic.removeprefix(self.prefix + "/").split("/") if topic.startswith(self.prefix + "/") else []
        try:
            for _, pattern, handler in self.routes:
                levels = match(pattern, relative)
                if levels is None:
                    continue
                if message.retain:  # only a stale retained message arrives flagged: never act on old intent
                    raise Rejected("a retained message is not a command: publish commands without retain",
                                   "retained")
                payload = self._decode(message.payload)
                answer = await handler(levels, payload)
                self.counters["accepted"] += 1
                if answer is not None:
                    await self._reply(client, f"{topic}/accepted", answer)
                return
            self.counters["unrouted"] += 1  # a subscription of an older session: nothing serves it
        except (BadRequest, ControlError, Rejected) as exc:
            await self._reject(client, topic, payload, exc)
        except JournalError as exc:  # nothing was committed: no PUBACK; a new session gets it again
            self.counters["not_committed"] += 1
            log.warning("control inbox: %s: not committed, taking it again after a reconnect: %s", topic, exc)
            raise
        except Exception as exc:  # a handler bug must not end the session: answer, count, log
            log.exception("control inbox: %s: handler failed", topic)
            await self._reject(client, topic, payload, Rejected(f"internal error: {type(exc).__name__}", "error"))

    def _decode(self, raw: object) -> dict[str, Any]:
        if isinstance(raw, str):
            raw = raw.encode()
        if not isinstance(raw, bytes | bytearray):
            raise Rejected("the message must be a JSON object", "bad_json")
        if len(raw) > self.config.max_payload:
            raise Rejected(f"the message is larger than {self.config.max_payload} bytes", "too_large")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            raise Rejected("the message is not JSON", "bad_json") from None
        if not isinstance(data, dict):
            raise Rejected("the message must be a JSON object", "bad_json")
        return data

    async def _reject(self, client: aiomqtt.Client, topic: str, payload: dict[str, Any] | None,
                      exc: Exception) -> None:
        kind = kind_of(exc)
        self.counters["rejected"] += 1
        self.counters[f"rejected_{kind}"] += 1
        level = logging.DEBUG if kind in self._warned else logging.WARNING
        self._warned.add(kind)
        log.log(level, "control inbox: rejected a message on %s (%s): %s", topic, kind, exc)
        request_id = payload.get("request_id") if payload else None
        await self._reply(client, f"{topic}/rejected", {
            "request_id": request_id if isinstance(request_id, str) else None, "error": str(exc), "kind": kind})

    async def _reply(self, client: aiomqtt.Client, topic: str, data: dict[str, Any]) -> None:
        try:
            await client.publish(topic, json.dumps(data, default=str).encode(), qos=1, timeout=self.config.timeout)
        except aiomqtt.MqttError as exc:  # the answer is a courtesy; the outcome is on commands/<id>
            self.counters["reply_failures"] += 1
            log.debug("control inbox: cannot answer on %s: %s", topic, exc)


def command_handler(control: Control) -> Route:
    """`meters/+/commands`: a command per message, as `POST /api/v1/meters/{address}/commands` takes it."""

    async def handle(levels: list[str], payload: dict[str, Any]) -> dict[str, Any]:
        meter = check_address(levels[0])
        command, _new = await submit(control, meter, parse_request(payload), actor="mqtt", source="mqtt")
        return {"request_id": command.request_id, "id": command.id, "state": str(command.state)}

    return handle
