"""`POST /api/v1/read`: a field engineer's one-shot read through the running daemon's bus.

The daemon owns every port, so `meterd read --link NAME` asks it to do the read
instead of opening the port a second time. The read is queued on the link's
bus at re-read priority: ahead of routine polls, behind control commands, and
never two requests on the line at once. Nothing is written to the journal;
the values come back in the answer. `read_items` is the same read for
`meterd read` when it opens the link itself, so both paths answer alike.

Request  ``{"link": "rs485-1", "address": "000000000001", "items": ["forward_active_energy", "0001FF00"],
"edition": 2007}`` (edition optional: the archive's, else 2007; ``peer`` for a tcp-listen link).
Answer: 200 with ``{"ok", "link", "address", "edition", "duration", "items": [...]}``; each item has
``ok``, ``values`` (quantity, value, unit, time, frozen, quality), and ``reason``/``error`` when it
failed. A meter that does not answer is a 200 with ``ok: false`` (the read itself worked); a bad
request is a 400, an unknown link 404, a link that is not running 503.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.api import ApiError, reply
from gateway.archive import MeterConfig
from gateway.bus import Bus, Priority
from gateway.config import Config
from gateway.model import Reading, Reason
from gateway.reader import Reader
from protocols.dlt645 import find

FIELD_PRIORITY = Priority.REREAD  # a person is waiting: ahead of routine polls, behind control
PLAN = "field-read"  # the plan name the readings carry (they are not journalled)
MAX_ITEMS = 32
# After these the meter (or the line) is gone: asking for the next items would only wait for timeouts.
STOP_AFTER = frozenset({Reason.NO_REPLY, Reason.LINK_DOWN, Reason.DEGRADED})


class ReadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    link: str = Field(min_length=1)
    address: str = Field(min_length=1)
    items: list[str] = Field(min_length=1, max_length=MAX_ITEMS)
    edition: Literal[2007, 1997] | None = None
    peer: str | None = None


def di_text(di: int, edition: int) -> str:
    return f"{di:04X}" if edition == 1997 else f"{di:08X}"


def meter_for(meters: Sequence[MeterConfig], link: str, address: str, edition: int | None = None,
              peer: str | None = None) -> MeterConfig:
    """The archive's meter (edition, tariffs, timeouts) on `link`, or a plain one for a meter not in it.

    ValueError when the address is not 12 digits."""
    try:
        plain = MeterConfig(address=address, link=link)
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
    known = next((m for m in meters if m.address == plain.address), None)
    update: dict[str, Any] = {"link": link}
    if edition is not None:
        update["edition"] = edition
    if peer is not None:
        update["peer"] = peer
    return (known or plain).model_copy(update=update)


def check_items(items: Sequence[str], edition: int) -> None:
    """ValueError naming every item the DI table of this edition does not know."""
    unknown = []
    for name in items:
        try:
            find(name, edition)
        except KeyError:
            unknown.append(name)
    if unknown:
        raise ValueError(f"not in the DL/T 645-{edition} table: {', '.join(unknown)} "
                         f"(a name such as forward_active_energy, or a DI in hex)")


def value_of(reading: Reading) -> dict[str, Any]:
    return {"quantity": reading.quantity, "value": reading.value, "unit": reading.unit, "time": reading.time,
            "frozen": reading.frozen, "quality": str(reading.quality)}


async def read_items(bus: Bus, reader: Reader, meter: MeterConfig, items: Sequence[str], *,
                     priority: Priority = FIELD_PRIORITY) -> dict[str, Any]:
    """Read each item once, one after the other; per item its values or why not.

    After a no-reply / link-down / degraded failure the remaining items are not asked."""
    started = time.time()
    results: list[dict[str, Any]] = []
    gave_up: str | None = None
    for name in items:
        item = find(name, meter.edition)
        entry: dict[str, Any] = {"item": name, "name": item.name, "di": di_text(item.di, meter.edition),
                                 "ok": False, "values": [], "reason": None, "error": None}
        results.append(entry)
        if gave_up is not None:
            entry["reason"], entry["error"] = "skipped", f"not asked: {gave_up}"
            continue
        outcome = await reader.read(bus, meter, [name], plan=PLAN, priority=priority)
        entry["values"] = [value_of(r) for r in outcome.readings]
        if outcome.ok:
            entry["ok"] = True
            continue
        reason = outcome.reason or Reason.NO_REPLY
        entry["reason"], entry["error"] = str(reason), outcome.detail.removeprefix(f"{name}: ")
        if reason in STOP_AFTER:
            gave_up = f"{reason} on {name}"
    return {"ok": all(r["ok"] for r in results), "link": meter.link, "address": meter.address,
            "edition": meter.edition, "duration": round(time.time() - started, 3), "items": results}


def read_routes(config: Callable[[], Config], bus_for: Callable[[MeterConfig], Bus | None],
                reader: Reader) -> list[web.RouteDef]:
    """The route for `ApiServer.add_routes` (before `start()`).

    `config` returns the running config (a reload replaces it); `bus_for` is the daemon's (it
    also makes the bus of a tcp-listen peer); `reader` reads a meter on a bus."""

    async def read(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, 'the body must be JSON: {"link": ..., "address": ..., "items": [...]}') from None
        try:
            ask = ReadRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise ApiError(400, f"{where}: {first['msg']}") from None
        running = config()
        link = next((cfg for cfg in running.links if cfg.name == ask.link), None)
        if link is None:
            names = ", ".join(cfg.name for cfg in running.links) or "none"
            raise ApiError(404, f"no link {ask.link!r} in the running daemon; links are {names}")
        try:
            meter = meter_for(running.meters, ask.link, ask.address, ask.edition, ask.peer)
            check_items(ask.items, meter.edition)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        if link.kind == "tcp-listen":  # a bus per DTU: only for DTUs the archive expects, never one per guess
            peers = {m.peer or m.address for m in running.meters if m.link == link.name}
            if (meter.peer or meter.address) not in peers:
                raise ApiError(400, f"link {link.name} has no DTU {meter.peer or meter.address!r}; give the peer "
                               "(DTU identity) of a meter of the archive on this link")
        bus = bus_for(meter)
        if bus is None:
            raise ApiError(503, f"link {ask.link} is not running")
        return reply(await read_items(bus, reader, meter, ask.items))

    return [web.post("/api/v1/read", read)]
