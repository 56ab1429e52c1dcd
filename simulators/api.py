"""The fleet's HTTP API (JSON) for test rigs: inspect meters, press buttons, change load and clock, kill
and revive meters, replace fault rules, read the ground truth.

Paths are a contract with test rigs; keep them. Every error is a 4xx with
`{"error": "..."}` that says what is wrong. Time comes from the injected
`clock` (UTC seconds), so tests can drive it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from simulators.bus import Bus
from simulators.faults import FaultRule
from simulators.fleet import Fleet, describe, fault_rule
from simulators.fleetfile import FaultSpec, address_text
from simulators.meter import Meter
from simulators.registers import to_datetime

FLEET = web.AppKey("fleet", Fleet)
Clock = Callable[[], float]
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def reply(data: object, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return reply({"error": str(exc)}, exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return reply({"error": f"{request.method} {request.path}: {exc.reason}"}, exc.status)


# --- helpers -------------------------------------------------------------------------------------
def _fleet(request: web.Request) -> Fleet:
    return request.app[FLEET]


def _now(request: web.Request) -> float:
    return request.app[CLOCK]()


def _meter(request: web.Request) -> tuple[Meter, Bus]:
    text = request.match_info["address"]
    try:
        address = address_text(text)
    except ValueError as exc:
        raise ApiError(400, f"bad address: {exc}") from None
    found = _fleet(request).locate(address)
    if found is None:
        raise ApiError(404, f"no meter {address} in this fleet")
    return found


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data


def _number(data: dict[str, Any], key: str, *, nullable: bool = False) -> float | None:
    if key not in data:
        raise ApiError(400, f"{key!r} is required")
    value = data[key]
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiError(400, f"{key!r} must be a finite number{' or null' if nullable else ''}, got {value!r}")
    return float(value)


def _state(request: web.Request, meter: Meter, bus: Bus) -> dict[str, Any]:
    rules = _fleet(request).faults_of(meter, bus)
    return {**meter.state(_now(request)), "bus": bus.name, "faults": [r.describe() for r in rules]}


# --- meters --------------------------------------------------------------------------------------
async def list_meters(request: web.Request) -> web.Response:
    only = request.query.get("bus")
    return reply([{"address": m.address, "bus": b.name, "edition": m.edition}
                  for m, b in _fleet(request).meters() if only is None or b.name == only])


async def show_meter(request: web.Request) -> web.Response:
    meter, bus = _meter(request)
    return reply(_state(request, meter, bus))


async def press_button(request: web.Request) -> web.Response:
    meter, bus = _meter(request)
    closed = meter.relay.press_button(meter, _now(request))
    return reply({"closed": closed, **_state(request, meter, bus)})


async def set_load(request: web.Request) -> web.Response:
    meter, bus = _meter(request)
    kw = _number(await _body(request), "kw", nullable=True)
    if kw is not None and kw < 0:
        raise ApiError(400, f"'kw' must be >= 0, got {kw}")
    try:
        meter.set_load(kw, _now(request))
    except ValueError as exc:  # the clock went back behind the meter's last load change
        raise ApiError(409, f"cannot change the load now: {exc}") from None
    return reply(_state(request, meter, bus))


async def set_clock(request: web.Request) -> web.Response:
    meter, bus = _meter(request)
    offset = _number(await _body(request), "offset_s")
    assert offset is not None
    if abs(offset) > 50 * 365 * 86400:
        raise ApiError(400, f"'offset_s' must be within 50 years, got {offset}")
    now = _now(request)
    meter.set_clock(to_datetime(meter.real_local(now) + offset), now)
    return reply(_state(request, meter, bus))


def _dead(rule: FaultRule, address: str) -> bool:
    return rule.kind == "dead" and rule.meter == address


async def kill(request: web.Request) -> web.Response:
    meter, bus = _meter(request)
    plan = _fleet(request).faults
    if not any(_dead(r, meter.address) and r.bus is None and r.start is None and r.end is None
               and r.every is None and r.probability >= 1.0 for r in plan.rules):
        plan.rules.append(FaultRule("dead", meter=meter.address))
    return reply(_state(request, meter, bus))


async def revive(request: web.Request) -> web.Response:
    meter, bus = _meter(request)
    plan = _fleet(request).faults
    plan.rules = [r for r in plan.rules if not _dead(r, meter.address)]
    return reply(_state(request, meter, bus))


# --- faults and truth ----------------------------------------------------------------------------
def _rules_in_force(fleet: Fleet) -> dict[str, Any]:
    return {"faults": [r.describe() for r in fleet.faults.rules]}


async def show_faults(request: web.Request) -> web.Response:
    return reply(_rules_in_force(_fleet(request)))


def _scope(fleet: Fleet, body: dict[str, Any]) -> tuple[str | None, str | None]:
    scope = body.get("scope")
    bus, meter = body.get("bus"), body.get("meter")
    if scope == "fleet":
        if bus is not None or meter is not None:
            raise ApiError(400, "scope 'fleet' takes neither 'bus' nor 'meter'")
        return None, None
    if scope == "bus":
        if meter is not None:
            raise ApiError(400, "scope 'bus' takes 'bus' only")
        if not isinstance(bus, str) or fleet.bus(bus) is None:
            raise ApiError(404 if isinstance(bus, str) else 400, f"scope 'bus' needs an existing 'bus', got {bus!r}")
        return bus, None
    if scope == "meter":
        if bus is not None:
            raise ApiError(400, "scope 'meter' takes 'meter' only (addresses are unique in a fleet)")
        try:
            address = address_text(meter)
        except ValueError as exc:
            raise ApiError(400, f"scope 'meter': bad 'meter': {exc}") from None
        if fleet.locate(address) is None:
            raise ApiError(404, f"no meter {address} in this fleet")
        return None, address
    raise ApiError(400, f"'scope' must be 'fleet', 'bus' or 'meter', got {scope!r}")


async def replace_faults(request: web.Request) -> web.Response:
    fleet = _fleet(request)
    body = await _body(request)
    extra = set(body) - {"scope", "bus", "meter", "faults"}
    if extra:
        raise ApiError(400, f"unknown keys: {', '.join(sorted(extra))}")
    bus, meter = _scope(fleet, body)
    given = body.get("faults")
    if not isinstance(given, list):
        raise ApiError(400, "'faults' must be a list of rules (an empty list clears the scope)")
    rules = []
    for i, data in enumerate(given):
        if not isinstance(data, dict):
            raise ApiError(400, f"faults[{i}]: a rule must be a JSON object")
        for key, want in (("bus", bus), ("meter", meter)):
            if data.get(key) not in (None, want):
                raise ApiError(400, f"faults[{i}].{key}: must match the scope ({want!r}) or be left out")
        try:
            spec = FaultSpec.model_validate({**data, "bus": bus, "meter": meter})
        except ValidationError as exc:
            raise ApiError(400, "; ".join(f"faults[{i}].{line}" for line in describe(exc))) from None
        rules.append(fault_rule(spec, started=_now(request), tz_offset_s=fleet.tz_offset_s))
    fleet.faults.replace(rules, bus=bus, meter=meter)
    return reply(_rules_in_force(fleet))


async def truth(request: web.Request) -> web.Response:
    fleet = _fleet(request)
    only = request.query.get("bus")
    if only is not None and fleet.bus(only) is None:
        raise ApiError(404, f"no bus named {only!r}")
    return reply(fleet.truth(_now(request), only))


def make_app(fleet: Fleet, *, clock: Callable[[], float] = time.time) -> web.Application:
    """The API over `fleet`; `clock` gives the time in UTC seconds (tests inject their own)."""
    app = web.Application(middlewares=[errors])
    app[FLEET] = fleet
    app[CLOCK] = clock
    app.add_routes([
        web.get("/meters", list_meters),
        web.get("/meters/{address}", show_meter),
        web.post("/meters/{address}/button", press_button),
        web.put("/meters/{address}/load", set_load),
        web.put("/meters/{address}/clock", set_clock),
        web.post("/meters/{address}/kill", kill),
        web.post("/meters/{address}/revive", revive),
        web.get("/faults", show_faults),
        web.put("/faults", replace_faults),
        web.get("/truth", truth),
    ])
    return app
