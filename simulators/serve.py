"""A fleet at work: every bus on its exposure, the HTTP API, a clean shutdown, and the truth at the end.

`serve(fleet, out=..., stop=...)` opens everything, prints one line per
exposure plus the API address and then `ready` (flushed), waits for `stop`,
closes everything and returns the ground truth. Exposure modules are
imported by name when a bus needs them, so a fleet of TCP buses never loads
the MQTT client.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO, cast

from aiohttp import web

from simulators.api import make_app
from simulators.bus import Bus
from simulators.exposure import Exposure
from simulators.fleet import Endpoint, Fleet

log = logging.getLogger(__name__)
Opener = Callable[..., Awaitable[Exposure]]
OPENERS = {
    "tcp": ("simulators.tcp", "serve_tcp"),
    "pty": ("simulators.pty", "serve_pty"),
    "serial": ("simulators.serialport", "serve_serial"),
    "dtu": ("simulators.dtu", "dial_dtu"),
    "mqtt": ("simulators.mqtt", "serve_mqtt"),
}
CLOSE_TIMEOUT = 5.0


class StartError(Exception):
    """Something the fleet needs could not be opened (port in use, no such device, ...)."""


def _describe(endpoint: Endpoint) -> str:
    o = endpoint.options
    if endpoint.kind in ("tcp", "dtu"):
        return f"{o['host']}:{o['port']}"
    return str(o.get("link") or o.get("device") or o.get("url") or "a new pty")


async def open_exposure(bus: Bus, endpoint: Endpoint) -> Exposure:
    module_name, function = OPENERS[endpoint.kind]
    try:
        opener = cast(Opener, getattr(importlib.import_module(module_name), function))
    except (ImportError, AttributeError) as exc:
        raise StartError(f"bus {bus.name}: the {endpoint.kind} exposure is not available ({exc})") from None
    try:
        return await opener(bus, **endpoint.options)
    except (OSError, ValueError) as exc:
        raise StartError(f"bus {bus.name}: cannot open {endpoint.kind} {_describe(endpoint)}: {exc}") from None


def where(exposure: Exposure) -> str:
    """What a client needs: a pty's link if it has one, and no repeated kind ('dtu -> h:p' -> '-> h:p')."""
    text = str(getattr(exposure, "path", "") or exposure.where)
    return text.removeprefix(f"{exposure.kind} ")


class Running:
    """The open exposures and API server of one fleet."""

    def __init__(self, fleet: Fleet, *, clock: Callable[[], float] = time.time) -> None:
        self.fleet = fleet
        self.clock = clock
        self.exposures: list[Exposure] = []
        self.runner: web.AppRunner | None = None
        self.api_url: str | None = None

    async def start(self, out: TextIO) -> None:
        """Open every exposure and the API, printing where each listens. StartError when one fails."""
        for bus in self.fleet.buses:
            exposure = await open_exposure(bus, self.fleet.endpoints[bus.name])
            self.exposures.append(exposure)
            out.write(f"{bus.name} {exposure.kind} {where(exposure)} ({len(bus.meters)} meters)\n")
        if self.fleet.api is not None:
            host, port = self.fleet.api
            self.runner = web.AppRunner(make_app(self.fleet, clock=self.clock), access_log=None)
            await self.runner.setup()
            try:
                await web.TCPSite(self.runner, host, port).start()
            except OSError as exc:
                raise StartError(f"api: cannot listen on {host}:{port}: {exc}") from None
            bound = self.runner.addresses[0]
            shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            self.api_url = f"http://{shown}:{bound[1]}"
            out.write(f"api {self.api_url}\n")
        out.write("ready\n")
        out.flush()

    async def close(self) -> None:
        """Stop the API, close every exposure (each given a few seconds), stop the buses."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        for exposure in reversed(self.exposures):
            try:
                await asyncio.wait_for(exposure.close(), CLOSE_TIMEOUT)
            except Exception:  # one stuck transport must not keep the others open
                log.exception("closing %s %s failed", exposure.kind, exposure.where)
        self.exposures.clear()
        for bus in self.fleet.buses:
            await bus.close()


async def serve(fleet: Fleet, *, out: TextIO, stop: asyncio.Event,
                clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """Serve until `stop` is set; return the ground truth. StartError if something cannot be opened."""
    running = Running(fleet, clock=clock)
    try:
        await running.start(out)
        await stop.wait()
    finally:
        await running.close()
    return fleet.truth(clock())


async def serve_until_signalled(fleet: Fleet, out: TextIO) -> dict[str, Any]:
    """`serve` until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await serve(fleet, out=out, stop=stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)


def summary(truth: dict[str, Any]) -> str:
    """One line for the end of a run."""
    t = truth["totals"]
    faults = sum(v for k, v in t.items() if k.startswith("fault_"))
    buses = len(truth["buses"])
    return (f"truth: {len(truth['meters'])} meters on {buses} bus{'es' if buses != 1 else ''}: "
            f"{t.get('requests', 0)} requests, {t.get('meter_answered', 0)} answered, "
            f"{t.get('meter_delivered', 0)} delivered, {faults} faults injected")
