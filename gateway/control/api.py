"""HTTP interface of control commands, and the request shape HTTP and MQTT share.

    POST /api/v1/meters/{address}/commands  {"action", "request_id", "valid_for", "reason"}
         -> 202 with the new command (Location: /api/v1/commands/{id}),
            200 with the existing one when `request_id` was used before (never a second execution)
    GET  /api/v1/commands/{id}               -> the command
    GET  /api/v1/meters/{address}/commands   -> {"meter", "commands": [...]} newest first (?limit=, 1..1000)
    GET  /api/v1/commands                    -> {"commands": [...]} of every meter, newest first

The ApiServer enforces the bearer token. A request that cannot be accepted is a 4xx with
`{"error": "..."}` naming what is wrong (an unknown action also gets `"actions": [...]`), and
is counted in `control.counters["api_rejected"]`. The command's JSON never holds a password.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from gateway.api import reply
from gateway.control.model import Action, Command, ControlError, UnknownAction
from gateway.plans import parse_duration

ADDRESS = re.compile(r"[0-9]{12}")
FIELDS = ("action", "request_id", "valid_for", "reason")
MAX_TEXT = 256  # request_id and reason: ids and short notes, not documents
MAX_LIST = 1000
ACTIONS = [str(a) for a in Action]


class Control(Protocol):
    """What the interfaces use of gateway.control.service.Control."""

    counters: dict[str, int]
    clock: Callable[[], float]  # the clock `Command.created` comes from

    async def submit(self, meter: str, action: str | Action, *, request_id: str | None = None,
                     valid_for: float | None = None, reason: str = "", actor: str = "",
                     source: str = "api") -> Command: ...

    async def get(self, command_id: str) -> Command: ...

    async def list(self, meter: str | None = None, limit: int = 100) -> list[Command]: ...


class BadRequest(ValueError):
    """A command request that is malformed; the message says which field and why."""

    def __init__(self, message: str, kind: str = "bad_request") -> None:
        super().__init__(message)
        self.kind = kind  # for counters and once-per-kind logs: bad_json, bad_field, unknown_action, ...


@dataclass(frozen=True)
class CommandRequest:
    action: Action
    request_id: str | None = None
    valid_for: float | None = None
    reason: str = ""


def check_address(address: str) -> str:
    """A meter address for a command: exactly 12 digits (no padding, no wildcards: a trip must be exact)."""
    if not ADDRESS.fullmatch(address):
        raise BadRequest(f"a meter address is 12 digits, got {address[:40]!r}", "bad_address")
    return address


def parse_valid_for(value: object) -> float:
    """`"90s"`, `"1h"`, `"1h30m"` or a number of seconds -> seconds (> 0)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadRequest(f"valid_for must be a duration such as \"90s\" or \"1h\", or seconds, got {value!r}",
                         "bad_valid_for")
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise BadRequest(f"valid_for: {exc}", "bad_valid_for") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise BadRequest(f"valid_for must be more than 0 s, got {value!r}", "bad_valid_for")
    return seconds


def parse_action(value: object) -> Action:
    if not isinstance(value, str):
        raise BadRequest(f"action must be a string, one of {', '.join(ACTIONS)}", "unknown_action")
    try:
        return Action(value.strip().lower())
    except ValueError:
        raise BadRequest(f"unknown action {value[:40]!r}; actions are {', '.join(ACTIONS)}",
                         "unknown_action") from None


def _text(body: Mapping[str, object], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string, got {type(value).__name__}", "bad_field")
    if len(value) > MAX_TEXT:
        raise BadRequest(f"{key} is longer than {MAX_TEXT} characters", "bad_field")
    return value


def parse_request(body: object) -> CommandRequest:
    """A decoded JSON body -> the request, or BadRequest naming the first thing wrong."""
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object: {"action": "trip", "request_id": ..., '
                         '"valid_for": "1h", "reason": ...}', "bad_json")
    unknown = sorted(str(k) for k in body if k not in FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; a command has {', '.join(FIELDS)}", "bad_field")
    if body.get("action") is None:
        raise BadRequest(f"action is missing; one of {', '.join(ACTIONS)}", "missing_action")
    action = parse_action(body["action"])
    request_id = _text(body, "request_id")
    if request_id is not None and not request_id.strip():
        raise BadRequest("request_id is empty; leave it out to have one made", "bad_field")
    valid_for = None if body.get("valid_for") is None else parse_valid_for(body["valid_for"])
    return CommandRequest(action, request_id, valid_for, _text(body, "reason") or "")


async def submit(control: Control, meter: str, ask: CommandRequest, *, actor: str,
                 source: str) -> tuple[Command, bool]:
    """Submit; True when it is a new command, False when the request_id returned an earlier one."""
    asked_at = control.clock()
    command = await control.submit(meter, ask.action, request_id=ask.request_id, valid_for=ask.valid_for,
                                   reason=ask.reason, actor=actor, source=source)
    # The service returns the earlier command for a known request_id; one made now is not older than us.
    return command, not (ask.request_id is not None and command.created < asked_at)


def rejection(exc: BadRequest | ControlError) -> dict[str, Any]:
    """The JSON error body for a request that was not accepted."""
    data: dict[str, Any] = {"error": str(exc)}
    if isinstance(exc, UnknownAction) or getattr(exc, "kind", "") == "unknown_action":
        data["actions"] = ACTIONS
    return data


def control_routes(control: Control) -> list[web.RouteDef]:
    """The routes for `ApiServer.add_routes` (before `start()`)."""

    def rejected(exc: BadRequest | ControlError) -> web.Response:
        control.counters["api_rejected"] = control.counters.get("api_rejected", 0) + 1
        status = exc.status if isinstance(exc, ControlError) else 400
        return reply(rejection(exc), status)

    async def post(request: web.Request) -> web.Response:
        try:
            meter = check_address(request.match_info["address"])
            try:
                body = await request.json()
            except ValueError:
                raise BadRequest("the body is not JSON", "bad_json") from None
            command, new = await submit(control, meter, parse_request(body), actor="api", source="api")
        except (BadRequest, ControlError) as exc:
            return rejected(exc)
        location = {"Location": f"/api/v1/commands/{command.id}"}
        return reply(command.public(), 202 if new else 200, location)

    async def one(request: web.Request) -> web.Response:
        try:
            return reply((await control.get(request.match_info["id"])).public())
        except ControlError as exc:
            return rejected(exc)

    async def of_meter(request: web.Request) -> web.Response:
        try:
            meter = check_address(request.match_info["address"])
            commands = await control.list(meter, _limit(request))
        except (BadRequest, ControlError) as exc:
            return rejected(exc)
        return reply({"meter": meter, "commands": [c.public() for c in commands]})

    async def every(request: web.Request) -> web.Response:
        try:
            commands = await control.list(None, _limit(request))
        except (BadRequest, ControlError) as exc:
            return rejected(exc)
        return reply({"commands": [c.public() for c in commands]})

    return [web.post("/api/v1/meters/{address}/commands", post),
            web.get("/api/v1/meters/{address}/commands", of_meter),
            web.get("/api/v1/commands/{id}", one),
            web.get("/api/v1/commands", every)]


def _limit(request: web.Request) -> int:
    text = request.query.get("limit", "100")
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIST:
        raise BadRequest(f"limit must be 1..{MAX_LIST}, got {text[:20]!r}", "bad_field")
    return int(text)


__all__ = ["BadRequest", "CommandRequest", "Control", "check_address", "control_routes",
           "parse_request", "parse_valid_for", "rejection", "submit"]
