"""`meterd read`: read a meter once and print the decoded values (for field engineers).

    meterd read --link rs485-1 000000000001 forward_active_energy voltage_a [--config FILE] [--json]
    meterd read --url 'serial:///dev/ttyUSB0?baud=2400&parity=E' 000000000001 00010000 voltage_a

With `--link` the link comes from the daemon's config. If the daemon runs (its API, `[api] listen`
and token from the same config), the read goes through the daemon's bus (`POST /api/v1/read`), so it
never fights the daemon for the port; if the daemon is not reachable, the link is opened here and
read once. `--url` needs no config: the URL's query takes any link setting (`baud`, `parity`,
`preamble`, `first_byte_timeout`, `retries`, ...). ITEM is a name from the DI table or a DI in hex.

Exit status: 0 every item read; 1 no reply, abnormal reply, link or daemon problem; 2 usage or config.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp
from pydantic import ValidationError
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from gateway.api import split_host_port
from gateway.api_read import check_items, meter_for, read_items
from gateway.archive import MeterConfig
from gateway.bus import Bus, Timing
from gateway.config import ConfigError, load_config
from gateway.links import LinkConfig, Listener, build_link, parse_link
from gateway.logs import set_trace, trace_logger
from gateway.reader import Dlt645Reader

DEFAULT_CONFIG = "/etc/meterd/meterd.toml"
DEFAULT_TZ = "Asia/Shanghai"  # Chinese meters keep Beijing time
URL_LINK = "cli"  # the link name of a --url read
API_TIMEOUT = 120.0  # s: the daemon's bus may be busy with a round before our job's turn


class UsageError(Exception):
    """Bad arguments or config: exit status 2."""


class ReadError(Exception):
    """The read could not be done (daemon refused, link cannot open): exit status 1."""


@dataclass
class Target:
    link: LinkConfig
    meter: MeterConfig
    items: list[str]
    station: str
    tz: ZoneInfo  # the meters' local time: freeze times are read in it and printed in it
    api_url: str | None = None
    token: str | None = None
    first_byte: float | None = None
    trace: bool = False


def add_parser(sub: Any) -> None:
    p = sub.add_parser("read", help="read a meter once (through the running daemon, or directly)",
                       description="Read ITEMs of the meter at ADDRESS once and print the decoded values. "
                       "--link NAME: a link of the config; through the running daemon when it runs, else the link "
                       "is opened here. --url: serial:///dev/ttyUSB0?baud=2400&parity=E or tcp://HOST:PORT.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--link", metavar="NAME", help="a link of the daemon's config")
    where.add_argument("--url", metavar="URL", help="serial:///dev/ttyUSB0?baud=2400&parity=E or tcp://HOST:PORT")
    p.add_argument("--config", "-c", type=Path, default=Path(os.environ.get("METERD_CONFIG", DEFAULT_CONFIG)),
                   help=f"the daemon's config, for --link (default $METERD_CONFIG or {DEFAULT_CONFIG})")
    p.add_argument("--edition", type=int, choices=(1997, 2007), help="DL/T 645 edition (default: the archive's, "
                   "else 2007)")
    p.add_argument("--tz", metavar="ZONE", help="the meters' timezone (default: the config's station timezone; "
                   f"with --url {DEFAULT_TZ})")
    p.add_argument("--timeout", type=float, metavar="S", help="first-byte timeout when reading directly")
    p.add_argument("--trace", action="store_true", help="print the frames on stderr (direct reads only)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("address", metavar="ADDRESS", help="the meter's 12-digit address")
    p.add_argument("items", nargs="+", metavar="ITEM", help="item name (forward_active_energy) or DI in hex")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        target = prepare(args)
        result = asyncio.run(execute(target))
    except (UsageError, ReadError) as exc:
        print(f"meterd read: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    if args.json:
        print(json.dumps(with_local_times(result, target.tz), indent=2, default=str))
    else:
        Console(markup=False, emoji=False, highlight=False).print(render(result, target.tz))
    if not result["ok"]:
        failed = [r for r in result["items"] if not r["ok"]]
        print(f"meterd read: {len(failed)} of {len(result['items'])} item(s) not read; {label(failed[0])}: "
              f"{why(failed[0])}", file=sys.stderr)
        return 1
    return 0


# --- what to read, where (blocking: config files, before the event loop) -----------------------------
def link_from_url(url: str) -> LinkConfig:
    """`serial:///dev/ttyUSB0?baud=2400&parity=E` or `tcp://HOST:PORT[?settings]` -> a link config."""
    parts = urllib.parse.urlsplit(url)
    settings: dict[str, Any] = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    if parts.scheme == "serial":
        device = parts.netloc + parts.path
        if not device:
            raise UsageError(f"--url {url!r}: no device (serial:///dev/ttyUSB0?baud=2400&parity=E)")
        data: dict[str, Any] = {"kind": "serial", "port": device}
    elif parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise UsageError(f"--url {url!r}: expected tcp://HOST:PORT")
        data = {"kind": "tcp", "host": parts.hostname, "port": port}
    else:
        raise UsageError(f"--url {url!r}: expected serial:///dev/... or tcp://HOST:PORT")
    clash = sorted(set(settings) & {"kind", "name", "port", "host"})
    if clash:
        raise UsageError(f"--url {url!r}: {', '.join(clash)} cannot be set in the query")
    try:
        return parse_link({**settings, **data, "name": URL_LINK})
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"][1:]) or "url"
        raise UsageError(f"--url {url!r}: {key}: {first['msg']}") from None


def api_url(listen: str) -> str:
    host, port = split_host_port(listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104 (a wildcard bind)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def prepare(args: argparse.Namespace) -> Target:
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be > 0")
    if args.url is not None:
        link = link_from_url(args.url)
        target = Target(link, _meter([], URL_LINK, args), list(args.items), "cli", ZoneInfo(DEFAULT_TZ))
    else:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        names = [cfg.name for cfg in config.links]
        chosen = next((cfg for cfg in config.links if cfg.name == args.link), None)
        if chosen is None:
            raise UsageError(f"{args.config}: no link {args.link!r}; links are {', '.join(names) or 'none'}")
        try:
            token = config.api.resolved_token()
        except ValueError as exc:
            raise UsageError(f"{args.config}: {exc} (needed to ask the running daemon)") from None
        target = Target(chosen, _meter(config.meters, chosen.name, args), list(args.items), config.station.name,
                        config.tz, api_url(config.api.listen), token)
    if args.tz is not None:
        try:
            target.tz = ZoneInfo(args.tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise UsageError(f"--tz {args.tz!r}: unknown timezone (e.g. Asia/Shanghai)") from None
    try:
        check_items(target.items, target.meter.edition)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    target.first_byte, target.trace = args.timeout, args.trace
    return target


def _meter(meters: list[MeterConfig], link: str, args: argparse.Namespace) -> MeterConfig:
    try:
        return meter_for(meters, link, args.address, args.edition)
    except ValueError as exc:
        raise UsageError(f"address {args.address!r}: {exc}") from None


# --- the read -----------------------------------------------------------------------------------------
async def execute(target: Target) -> dict[str, Any]:
    if target.api_url is not None:
        result = await via_daemon(target, target.api_url)
        if result is not None:
            return {**result, "via": "daemon"}
    return {**await direct(target), "via": "direct"}


async def via_daemon(target: Target, url: str) -> dict[str, Any] | None:
    """The daemon's answer; None when no daemon listens there (then the link is free to open)."""
    body = {"link": target.link.name, "address": target.meter.address, "items": target.items,
            "edition": target.meter.edition}
    headers = {"Authorization": f"Bearer {target.token}"} if target.token else {}
    timeout = aiohttp.ClientTimeout(total=API_TIMEOUT, sock_connect=3.0)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.post(f"{url}/api/v1/read", json=body, headers=headers) as response:
            text = await response.text()
            status = response.status
    except aiohttp.ClientConnectorError:
        return None  # nobody listens: the daemon is not running
    except TimeoutError:
        raise ReadError(f"the daemon at {url} did not answer within {API_TIMEOUT:g} s") from None
    except aiohttp.ClientError as exc:
        raise ReadError(f"the daemon at {url} failed: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if status == 401:
        raise ReadError(f"the daemon at {url} refused the token (the config's [api] token or token_file)")
    if status == 404 and not (isinstance(data, dict) and str(data.get("error", "")).startswith("no link")):
        raise ReadError(f"something at {url} answers, but has no /api/v1/read (an older meterd?); "
                        "stop it to read the link directly")
    if status != 200 or not isinstance(data, dict) or "items" not in data:
        error = data.get("error") if isinstance(data, dict) else text[:200]
        raise ReadError(f"the daemon at {url} answered HTTP {status}: {error}")
    return data


async def direct(target: Target) -> dict[str, Any]:
    """Open the link, start a bus on it, read once, close."""
    cfg = target.link
    if cfg.kind == "tcp-listen":
        raise ReadError(f"link {cfg.name} is a tcp-listen link (DTUs dial in to the daemon): start the daemon, "
                        "or use --url with the meter's serial port or serial server")
    link = build_link(cfg)
    assert not isinstance(link, Listener)
    meter = target.meter
    timing = Timing(target.first_byte or meter.first_byte_timeout or cfg.first_byte_timeout_s,
                    meter.inter_byte_timeout or cfg.inter_byte_timeout_s, cfg.gap, cfg.retries, cfg.preamble)
    if target.trace:
        set_trace(cfg.name, enabled=True)
        trace_logger(cfg.name).addHandler(logging.StreamHandler(sys.stderr))
    logging.getLogger("gateway.links").setLevel(logging.ERROR)  # the outcome below says it once
    bus = Bus(link, timing, trace=trace_logger(cfg.name) if target.trace else None)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(link.run(stop)), asyncio.create_task(bus.run(stop))]
    try:
        if not await link.wait_up(getattr(cfg, "connect_timeout", 5.0) + 1.0):
            raise ReadError(f"cannot open {cfg.kind} link {cfg.name}: {link.detail}")
        reader = Dlt645Reader(target.station, target.tz, lambda _m: timing)
        return await read_items(bus, reader, meter, target.items)
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=5.0)


# --- output -------------------------------------------------------------------------------------------
def local_time(stamp: float, tz: ZoneInfo) -> str:
    return dt.datetime.fromtimestamp(stamp, tz).isoformat(sep=" ", timespec="seconds")


def with_local_times(result: dict[str, Any], tz: ZoneInfo) -> dict[str, Any]:
    for item in result["items"]:
        for value in item["values"]:
            value["time_local"] = local_time(value["time"], tz)
    return result


def label(item: dict[str, Any]) -> str:
    return item["name"] if item["name"] == item["di"] else f"{item['name']} ({item['di']})"


def why(item: dict[str, Any]) -> str:
    reason, error = item["reason"], item["error"]
    return str(reason) if not error or error == reason else f"{reason}: {error}"


def render(result: dict[str, Any], tz: ZoneInfo) -> Group:
    """The values as a table; items that failed as a red word in it and their reason below it."""
    title = (f"meter {result['address']} on {result['link']} (DL/T 645-{result['edition']}, "
             f"{'through the daemon' if result.get('via') == 'daemon' else 'direct'}, {result['duration']:.2f} s)")
    table = Table(title=title, title_justify="left")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_column("unit")
    table.add_column("time (frozen data)")
    notes: list[Text] = []
    for item in result["items"]:
        for value in item["values"]:
            shown = Text(str(value["value"]), style="" if value["quality"] == "good" else "yellow")
            stamp = local_time(value["time"], tz) if value["frozen"] else ""
            table.add_row(value["quantity"], shown, value["unit"], stamp)
        if not item["ok"]:
            table.add_row(item["name"] if not item["values"] else "", Text(item["reason"], style="red"), "", "")
            notes.append(Text(f"{label(item)}: {why(item)}", style="red"))
    return Group(table, *notes)
