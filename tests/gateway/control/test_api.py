"""The control commands' HTTP interface on a real 127.0.0.1 ApiServer (token on): what a billing
system or an operator sends, and what they get back for good and bad requests.

The engine is a small in-memory stand-in (`FakeControl`) with the service's interface: idempotent
request ids, unknown meters, not-found ids; test_inbox and test_cli use it too."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from gateway.api import ApiConfig, ApiServer
from gateway.archive import MeterConfig
from gateway.bus import Timing
from gateway.control.api import Control as ControlLike
from gateway.control.api import control_routes, parse_request, parse_valid_for
from gateway.control.config import ControlConfig
from gateway.control.model import Action, Command, Conflict, NotFound, State, UnknownAction, UnknownMeter
from gateway.control.service import Control
from gateway.journal import Journal
from gateway.stats import CollectionStats

TOKEN = "s3cret-token"
METER = "000000000001"
OTHER = "000000000002"


class FakeControl:
    """In-memory stand-in for gateway.control.service.Control."""

    def __init__(self, meters: tuple[str, ...] = (METER, OTHER)) -> None:
        self.meters = set(meters)
        self.commands: dict[str, Command] = {}
        self.by_request: dict[str, str] = {}
        self.calls: list[dict[str, Any]] = []
        self.counters: dict[str, int] = {}
        self.clock = time.time
        self._ids = itertools.count(1)

    async def submit(self, meter: str, action: str | Action, *, request_id: str | None = None,
                     valid_for: float | None = None, reason: str = "", actor: str = "",
                     source: str = "api") -> Command:
        self.calls.append({"meter": meter, "action": action, "request_id": request_id, "valid_for": valid_for,
                           "reason": reason, "actor": actor, "source": source})
        if meter not in self.meters:
            raise UnknownMeter(f"meter {meter} is not in the archive")
        try:
            action = Action(action)
        except ValueError:
            raise UnknownAction(f"unknown action {action!r}") from None
        if request_id is not None and request_id in self.by_request:
            known = self.commands[self.by_request[request_id]]
            if (known.meter, known.action) != (meter, action):
                raise Conflict(f"request_id {request_id!r} is command {known.id} for {known.meter} {known.action}")
            return known
        now = time.time()
        cid = f"c{next(self._ids):04d}"
        command = Command(id=cid, request_id=request_id or f"auto-{cid}", meter=meter, action=action,
                          state=State.PENDING, created=now, deadline=now + (valid_for or 3600.0), actor=actor,
                          reason=reason, source=source, updated=now)
        self.commands[cid] = command
        self.by_request[command.request_id] = cid
        return command

    async def get(self, command_id: str) -> Command:
        if command_id not in self.commands:
            raise NotFound(f"no command {command_id!r}")
        return self.commands[command_id]

    async def list(self, meter: str | None = None, limit: int = 100) -> list[Command]:
        found = [c for c in self.commands.values() if meter is None or c.meter == meter]
        return sorted(found, key=lambda c: c.created, reverse=True)[:limit]

    def move(self, command_id: str, state: State, **changes: Any) -> Command:
        """What the engine does as the command progresses."""
        command = self.commands[command_id] = replace(self.commands[command_id], state=state, updated=time.time(),
                                                      **changes)
        return command


@pytest.fixture
def control() -> FakeControl:
    return FakeControl()


@contextlib.asynccontextmanager
async def served_api(control: ControlLike) -> AsyncIterator[str]:
    server = ApiServer(ApiConfig(listen="127.0.0.1:0", token=TOKEN), CollectionStats("st-01", ZoneInfo("UTC")),
                       journal_ok=lambda: True, links_up=lambda: 1)
    server.add_routes(control_routes(control))
    await server.start()
    try:
        yield server.url
    finally:
        await server.stop()


@pytest.fixture
async def api(control: FakeControl) -> AsyncIterator[str]:
    async with served_api(control) as url:
        yield url


async def call(method: str, url: str, body: Any = None, *, raw: bytes | None = None,
               token: str | None = TOKEN) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, \
            session.request(method, url, json=body if raw is None else None, data=raw, headers=headers) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def test_post_records_the_command_and_answers_202_with_it(api: str, control: FakeControl) -> None:
    status, body, headers = await call("POST", f"{api}/api/v1/meters/{METER}/commands",
                                       {"action": "trip", "request_id": "bill-77", "valid_for": "90s",
                                        "reason": "balance below zero"})
    assert status == 202
    assert body["meter"] == METER and body["action"] == "trip" and body["state"] == "pending"
    assert body["request_id"] == "bill-77" and body["reason"] == "balance below zero"
    assert body["terminal"] is False and body["actor"] == "api" and body["source"] == "api"
    assert headers["Location"] == f"/api/v1/commands/{body['id']}"
    assert control.calls == [{"meter": METER, "action": Action.TRIP, "request_id": "bill-77", "valid_for": 90.0,
                              "reason": "balance below zero", "actor": "api", "source": "api"}]
    assert "password" not in str(body).lower()


async def test_the_same_request_id_returns_the_same_command_with_200(api: str, control: FakeControl) -> None:
    ask = {"action": "close", "request_id": "pay-1", "valid_for": 3600}
    first_status, first, _ = await call("POST", f"{api}/api/v1/meters/{METER}/commands", ask)
    again_status, again, _ = await call("POST", f"{api}/api/v1/meters/{METER}/commands", ask)
    assert (first_status, again_status) == (202, 200)
    assert again["id"] == first["id"] and len(control.commands) == 1


async def test_a_command_can_be_followed_by_id_and_listed_per_meter(api: str, control: FakeControl) -> None:
    ids = []
    for action in ("alarm", "trip", "close"):
        _, body, _ = await call("POST", f"{api}/api/v1/meters/{METER}/commands", {"action": action})
        ids.append(body["id"])
    await call("POST", f"{api}/api/v1/meters/{OTHER}/commands", {"action": "hold"})
    control.move(ids[1], State.SUPERSEDED, fail_reason=f"superseded by {ids[2]}")

    status, one, _ = await call("GET", f"{api}/api/v1/commands/{ids[1]}")
    assert status == 200 and one["state"] == "superseded" and one["terminal"] is True
    status, listing, _ = await call("GET", f"{api}/api/v1/meters/{METER}/commands")
    assert status == 200 and listing["meter"] == METER
    assert [c["id"] for c in listing["commands"]] == ids[::-1]  # newest first, only this meter's
    _, limited, _ = await call("GET", f"{api}/api/v1/meters/{METER}/commands?limit=1")
    assert [c["id"] for c in limited["commands"]] == [ids[2]]
    _, every, _ = await call("GET", f"{api}/api/v1/commands")
    assert len(every["commands"]) == 4


@pytest.mark.parametrize(("path", "body", "status", "says"), [
    ("/api/v1/meters/12345/commands", {"action": "trip"}, 400, "12 digits"),
    ("/api/v1/meters/00000000000A/commands", {"action": "trip"}, 400, "12 digits"),
    ("/api/v1/meters/999999999999/commands", {"action": "trip"}, 404, "999999999999 is not in the archive"),
    (f"/api/v1/meters/{METER}/commands", {"action": "explode"}, 400, "unknown action 'explode'"),
    (f"/api/v1/meters/{METER}/commands", {"reason": "no action"}, 400, "action is missing"),
    (f"/api/v1/meters/{METER}/commands", {"action": 7}, 400, "action must be a string"),
    (f"/api/v1/meters/{METER}/commands", {"action": "trip", "valid_for": "soon"}, 400, "valid_for"),
    (f"/api/v1/meters/{METER}/commands", {"action": "trip", "valid_for": -5}, 400, "valid_for must be more than 0"),
    (f"/api/v1/meters/{METER}/commands", {"action": "trip", "valid_for": True}, 400, "valid_for must be"),
    (f"/api/v1/meters/{METER}/commands", {"action": "trip", "request_id": 5}, 400, "request_id must be a string"),
    (f"/api/v1/meters/{METER}/commands", {"action": "trip", "request_id": " "}, 400, "request_id is empty"),
    (f"/api/v1/meters/{METER}/commands", {"action": "trip", "reason": ["x"]}, 400, "reason must be a string"),
    (f"/api/v1/meters/{METER}/commands", {"action": "trip", "password": "123"}, 400, "unknown field(s) password"),
    (f"/api/v1/meters/{METER}/commands", ["trip"], 400, "must be a JSON object"),
])
async def test_bad_requests_say_what_is_wrong_and_nothing_is_submitted(
        api: str, control: FakeControl, path: str, body: Any, status: int, says: str) -> None:
    got, answer, _ = await call("POST", api + path, body)
    assert got == status and says in answer["error"], answer
    assert not control.commands
    assert control.counters["api_rejected"] == 1


async def test_unknown_action_lists_the_actions(api: str) -> None:
    status, answer, _ = await call("POST", f"{api}/api/v1/meters/{METER}/commands", {"action": "reboot"})
    assert status == 400 and answer["actions"] == [str(a) for a in Action]


async def test_a_body_that_is_not_json_is_refused(api: str, control: FakeControl) -> None:
    status, answer, _ = await call("POST", f"{api}/api/v1/meters/{METER}/commands", raw=b"action=trip")
    assert status == 400 and "not JSON" in answer["error"] and not control.commands


async def test_a_request_id_used_for_another_command_is_a_conflict(api: str) -> None:
    await call("POST", f"{api}/api/v1/meters/{METER}/commands", {"action": "trip", "request_id": "k1"})
    status, answer, _ = await call("POST", f"{api}/api/v1/meters/{OTHER}/commands",
                                   {"action": "trip", "request_id": "k1"})
    assert status == 409 and "k1" in answer["error"]


async def test_unknown_ids_bad_limits_and_missing_tokens(api: str, control: FakeControl) -> None:
    status, answer, _ = await call("GET", f"{api}/api/v1/commands/nope")
    assert status == 404 and "nope" in answer["error"]
    status, answer, _ = await call("GET", f"{api}/api/v1/meters/{METER}/commands?limit=0")
    assert status == 400 and "limit" in answer["error"]
    status, answer, _ = await call("GET", f"{api}/api/v1/meters/1/commands")
    assert status == 400 and "12 digits" in answer["error"]
    status, answer, _ = await call("POST", f"{api}/api/v1/meters/{METER}/commands", {"action": "trip"}, token=None)
    assert status == 401 and "token" in answer["error"] and not control.commands
    status, _, _ = await call("POST", f"{api}/api/v1/meters/{METER}/commands", {"action": "trip"}, token="wrong")
    assert status == 401 and not control.commands


def test_request_parsing_accepts_what_callers_write() -> None:
    ask = parse_request({"action": " Allow_Close ", "valid_for": "1h30m", "request_id": "r", "reason": None})
    assert (ask.action, ask.valid_for, ask.request_id, ask.reason) == (Action.ALLOW_CLOSE, 5400.0, "r", "")
    assert parse_request({"action": "trip"}).valid_for is None
    assert parse_valid_for(2.5) == 2.5 and parse_valid_for("2d") == 172800.0


async def test_with_the_real_control_service_and_journal(tmp_path: Path) -> None:
    """The routes on the real Control (not running its lanes: commands stay pending) and a real journal."""
    async with Journal(tmp_path / "journal.sqlite") as journal:
        meters = {METER: MeterConfig(address=METER, link="bus1")}
        control = Control(ControlConfig(quiet_hours=None), journal, station="st-01", tz=ZoneInfo("UTC"),
                          meter_for=meters.get, bus_for=lambda m: None, timing_for=lambda m: Timing())
        await control.start()
        async with served_api(control) as url:
            ask = {"action": "allow_close", "request_id": "pay-3", "valid_for": "5m", "reason": "paid"}
            first_status, first, _ = await call("POST", f"{url}/api/v1/meters/{METER}/commands", ask)
            again_status, again, _ = await call("POST", f"{url}/api/v1/meters/{METER}/commands", ask)
            status, unknown, _ = await call("POST", f"{url}/api/v1/meters/{OTHER}/commands", {"action": "trip"})
            _, listed, _ = await call("GET", f"{url}/api/v1/meters/{METER}/commands")
            _, one, _ = await call("GET", f"{url}/api/v1/commands/{first['id']}")
    assert (first_status, again_status, again["id"]) == (202, 200, first["id"])
    assert first["state"] == "pending" and first["deadline"] == pytest.approx(first["created"] + 300)
    assert status == 404 and OTHER in unknown["error"]
    assert [c["id"] for c in listed["commands"]] == [first["id"]] and one["request_id"] == "pay-3"
    assert control.counters["api_rejected"] == 1 and control.counters["duplicates"] == 1
