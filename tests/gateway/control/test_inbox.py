"""Commands in over MQTT, through a real Mosquitto: routing, answers to bad messages, messages sent
while meterd was away, redelivery of a message whose handling never finished, reconnects.

The engine is the in-memory FakeControl of test_api (the unit here is the inbox)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import pytest

from gateway.control.inbox import COMMANDS, Inbox, InboxConfig, Rejected, command_handler, match
from gateway.control.model import Action
from gateway.journal_store import JournalError
from tests.gateway.control.test_api import METER, FakeControl
from tests.integration.test_sinks_real import Proxy, wait_for
from tests.services import Mosquitto

pytestmark = pytest.mark.integration


def config(broker: Mosquitto | Proxy, **kw: Any) -> InboxConfig:
    host = broker.target.host if isinstance(broker, Proxy) else broker.host
    return InboxConfig(url=f"mqtt://{host}:{broker.port}", client_id=f"inbox-{uuid.uuid4().hex[:10]}",
                       reconnect_min=0.05, reconnect_max=0.2, **kw)


def station() -> str:
    return f"st{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def running(inbox: Inbox) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(inbox.run(stop))
    try:
        await asyncio.wait_for(inbox.connected.wait(), 10)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def publish(broker: Mosquitto, topic: str, payload: Any, *, retain: bool = False) -> None:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"pub-{uuid.uuid4().hex}") as client:
        await client.publish(topic, body, qos=1, retain=retain)


class Watch:
    """Keeps the inbox's answers (`<prefix>/.../accepted|rejected`) as (topic, decoded JSON, retain)."""

    def __init__(self, broker: Mosquitto, prefix: str) -> None:
        self.broker, self.prefix = broker, prefix
        self.messages: list[tuple[str, Any, bool]] = []

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Watch]:
        async with aiomqtt.Client(self.broker.host, self.broker.port, identifier=f"w-{uuid.uuid4().hex}") as c:
            for depth in range(1, 4):
                for answer in ("accepted", "rejected"):
                    await c.subscribe("/".join([self.prefix, *["+"] * depth, answer]), qos=1)
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
        return [p for t, p, _ in self.messages if t.endswith(f"/{suffix}")]


@pytest.fixture
def control() -> FakeControl:
    return FakeControl()


async def test_a_command_message_is_submitted_and_acknowledged(mosquitto: Mosquitto, control: FakeControl) -> None:
    st = station()
    inbox = Inbox(config(mosquitto), st)
    inbox.route(COMMANDS, command_handler(control))
    topic = f"meterd/{st}/meters/{METER}/commands"
    async with Watch(mosquitto, f"meterd/{st}/meters").open() as answers, running(inbox):
        await publish(mosquitto, topic, {"action": "trip", "request_id": "bill-1", "valid_for": "10m",
                                         "reason": "overdrawn"})
        await wait_for(lambda: bool(answers.on("accepted")), what="the acceptance")
    assert control.calls == [{"meter": METER, "action": Action.TRIP, "request_id": "bill-1", "valid_for": 600.0,
                              "reason": "overdrawn", "actor": "mqtt", "source": "mqtt"}]
    (command,) = control.commands.values()
    assert answers.on("accepted") == [{"request_id": "bill-1", "id": command.id, "state": "pending"}]
    assert inbox.counters["accepted"] == 1 and inbox.counters["rejected"] == 0


async def test_bad_messages_are_answered_counted_and_warned_once_per_kind(
        mosquitto: Mosquitto, control: FakeControl, caplog: pytest.LogCaptureFixture) -> None:
    st = station()
    inbox = Inbox(config(mosquitto), st)
    inbox.route(COMMANDS, command_handler(control))
    base = f"meterd/{st}/meters"
    sent: list[tuple[str, Any]] = [
        (METER, b"trip please"), (METER, b"\xff\xfe"), (METER, ["trip"]),
        (METER, {"reason": "no action", "request_id": "r-1"}),
        (METER, {"action": "explode", "request_id": "r-2"}),
        ("999999999999", {"action": "trip", "request_id": "r-3"}),
        ("12345", {"action": "trip"}),
        (METER, {"action": "trip", "valid_for": "soon", "request_id": "r-4"}),
        (METER, {"action": "trip", "request_id": 7}),
    ]
    async with Watch(mosquitto, base).open() as answers, running(inbox):
        with caplog.at_level(logging.DEBUG, logger="gateway.control.inbox"):
            for meter, payload in sent:
                await publish(mosquitto, f"{base}/{meter}/commands", payload)
            await wait_for(lambda: len([t for t, _, _ in answers.messages if t.endswith("/rejected")]) == len(sent),
                           what="an answer to every bad message")
    assert not control.commands
    rejected = [(t.removeprefix(base + "/"), p) for t, p, _ in answers.messages if t.endswith("/rejected")]
    by_kind = {p["kind"]: (t, p) for t, p in rejected}
    assert set(by_kind) == {"bad_json", "missing_action", "unknown_action", "unknown_meter", "bad_address",
                            "bad_valid_for", "bad_field"}
    assert by_kind["missing_action"][1] == {"request_id": "r-1", "kind": "missing_action",
                                            "error": "action is missing; one of " + ", ".join(map(str, Action))}
    assert "unknown action 'explode'" in by_kind["unknown_action"][1]["error"]
    assert by_kind["unknown_meter"] == ("999999999999/commands/rejected", {
        "request_id": "r-3", "kind": "unknown_meter", "error": "meter 999999999999 is not in the archive"})
    assert by_kind["bad_address"][0] == "12345/commands/rejected"
    assert by_kind["bad_valid_for"][1]["request_id"] == "r-4" and "valid_for" in by_kind["bad_valid_for"][1]["error"]
    assert by_kind["bad_field"][1]["request_id"] is None  # not a string: not echoed as one
    assert inbox.counters["rejected"] == len(sent) and inbox.counters["rejected_bad_json"] == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 7 and sum("bad_json" in r.getMessage() for r in warnings) == 1


async def test_commands_sent_while_meterd_was_away_are_delivered_when_it_is_back(
        mosquitto: Mosquitto, control: FakeControl) -> None:
    st = station()
    cfg = config(mosquitto)
    first = Inbox(cfg, st)
    first.route(COMMANDS, command_handler(control))
    async with running(first):
        pass  # the broker now keeps this client id's session and subscriptions
    await publish(mosquitto, f"meterd/{st}/meters/{METER}/commands", {"action": "close", "request_id": "pay-7"})
    again = Inbox(cfg, st)  # the restarted daemon, same client id
    again.route(COMMANDS, command_handler(control))
    async with running(again):
        await wait_for(lambda: bool(control.commands), what="the queued command")
    (command,) = control.commands.values()
    assert (command.request_id, command.action, command.source) == ("pay-7", Action.CLOSE, "mqtt")


async def test_a_message_whose_handling_never_finished_is_delivered_again(mosquitto: Mosquitto) -> None:
    st = station()
    cfg = config(mosquitto)
    started = asyncio.Event()
    handled: list[dict[str, Any]] = []

    async def hangs(levels: list[str], payload: dict[str, Any]) -> None:
        started.set()
        await asyncio.Event().wait()  # meterd dies here: before the command was committed

    async def works(levels: list[str], payload: dict[str, Any]) -> None:
        handled.append({"account": levels[0], **payload})

    first = Inbox(cfg, st)
    first.route("accounts/+/payments", hangs)
    async with running(first):
        await publish(mosquitto, f"meterd/{st}/accounts/A-17/payments", {"amount": 50, "payment_id": "p1"})
        await asyncio.wait_for(started.wait(), 10)
    again = Inbox(cfg, st)
    again.route("accounts/+/payments", works)
    async with running(again):
        await wait_for(lambda: bool(handled), what="the redelivered payment")
    assert handled == [{"account": "A-17", "amount": 50, "payment_id": "p1"}]


async def test_a_message_the_journal_could_not_commit_comes_again(mosquitto: Mosquitto) -> None:
    st = station()
    inbox = Inbox(config(mosquitto), st)
    calls: list[dict[str, Any]] = []

    async def journal_full_once(levels: list[str], payload: dict[str, Any]) -> dict[str, Any]:
        calls.append(payload)
        if len(calls) == 1:
            raise JournalError("the journal cannot grow: database or disk is full")
        return {"ok": True}

    inbox.route("accounts/+/payments", journal_full_once)
    async with Watch(mosquitto, f"meterd/{st}/accounts").open() as answers, running(inbox):
        await publish(mosquitto, f"meterd/{st}/accounts/A-1/payments", {"payment_id": "p9"})
        await wait_for(lambda: bool(answers.on("accepted")), what="the second, committed delivery")
    assert calls == [{"payment_id": "p9"}] * 2 and not answers.on("rejected")
    assert inbox.counters["not_committed"] == 1 and inbox.counters["connects"] == 2


async def test_the_inbox_reconnects_and_subscribes_again(mosquitto: Mosquitto, control: FakeControl) -> None:
    proxy = Proxy(mosquitto)
    await proxy.listen()
    st = station()
    inbox = Inbox(config(proxy), st)
    inbox.route(COMMANDS, command_handler(control))
    try:
        async with running(inbox):
            proxy.cut()
            await wait_for(lambda: inbox.counters["connects"] == 2 and inbox.connected.is_set(),
                           what="a new session")
            await publish(mosquitto, f"meterd/{st}/meters/{METER}/commands", {"action": "alarm"})
            await wait_for(lambda: bool(control.commands), what="the command after the reconnect")
        assert inbox.counters["disconnects"] == 1
    finally:
        await proxy.close()


async def test_a_stale_retained_command_is_refused(mosquitto: Mosquitto, control: FakeControl) -> None:
    st = station()
    topic = f"meterd/{st}/meters/{METER}/commands"
    await publish(mosquitto, topic, {"action": "trip", "request_id": "old"}, retain=True)
    inbox = Inbox(config(mosquitto), st)
    inbox.route(COMMANDS, command_handler(control))
    try:
        async with running(inbox):
            await wait_for(lambda: inbox.counters["rejected_retained"] == 1, what="the refusal")
        assert not control.commands
    finally:
        await publish(mosquitto, topic, b"", retain=True)  # clear the retained message


async def test_a_handler_bug_is_answered_and_the_session_goes_on(mosquitto: Mosquitto) -> None:
    st = station()
    inbox = Inbox(config(mosquitto), st)
    seen: list[str] = []

    async def flaky(levels: list[str], payload: dict[str, Any]) -> dict[str, Any]:
        seen.append(levels[0])
        if levels[0] == "bad":
            raise KeyError("balance")
        if levels[0] == "refused":
            raise Rejected("account closed", "account_closed")
        return {"ok": True}

    inbox.route("accounts/+/payments", flaky)
    base = f"meterd/{st}/accounts"
    async with Watch(mosquitto, base).open() as answers, running(inbox):
        for account in ("bad", "refused", "good"):
            await publish(mosquitto, f"{base}/{account}/payments", {"request_id": account})
        await wait_for(lambda: len(answers.messages) == 3, what="three answers")
    assert answers.on("bad/payments/rejected") == [{"request_id": "bad", "kind": "error",
                                                     "error": "internal error: KeyError"}]
    assert answers.on("refused/payments/rejected")[0]["kind"] == "account_closed"
    assert answers.on("good/payments/accepted") == [{"ok": True}]
    assert seen == ["bad", "refused", "good"] and inbox.connected.is_set() is False  # stopped cleanly


def test_routes_and_matching() -> None:
    inbox = Inbox(InboxConfig(), "north/1")
    assert inbox.prefix == "meterd/north_1" and inbox.client_id == "meterd-north_1-inbox"
    for bad in ("meters/#", "meters/+x/commands", "", "meters//commands"):
        with pytest.raises(ValueError, match="route pattern"):
            inbox.route(bad, command_handler(FakeControl()))
    assert match(["meters", "+", "commands"], ["meters", "000000000001", "commands"]) == ["000000000001"]
    assert match(["meters", "+", "commands"], ["meters", "1", "commands", "rejected"]) is None
    assert match(["meters", "+", "commands"], ["accounts", "1", "commands"]) is None
    assert "secret" not in repr(InboxConfig(password="secret"))
