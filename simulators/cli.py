"""`metersim`: serve a simulated meter fleet (`serve`), list fault kinds (`faults`), check a fleet file (`check`).

    metersim serve --tcp 127.0.0.1:9000 --meters 50 --baud 2400 --fault no_reply=0.02 --api 127.0.0.1:8080
    metersim serve --fleet config/fleet-small.toml --truth truth.json

Exit status: 0 after a clean shutdown (SIGINT/SIGTERM), 2 for a bad fleet
file or bad flags, 1 when something cannot be opened (port in use, no device).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from simulators.faults import KINDS, FaultError, FaultRule
from simulators.fleet import build, describe, load, parse, plan
from simulators.fleetfile import ApiSpec, FaultSpec, FleetError, FleetFile, address_text, host_port
from simulators.serve import StartError, serve_until_signalled, summary

BUS_FLAGS = ("meters", "first_address", "edition", "baud", "reply_delay_ms", "bus", "registration",
             "register_mode", "heartbeat", "heartbeat_s", "request_topic", "response_topic", "hex", "parity")


def _arg(check: Any) -> Any:
    def convert(text: str) -> Any:
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = check.__name__
    return convert


def _delay(text: str) -> list[float]:
    low, sep, high = text.partition(",")
    try:
        pair = [float(low), float(high if sep else low)]
    except ValueError:
        raise ValueError(f"expected MIN,MAX in ms, got {text!r}") from None
    return pair


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metersim", description="Simulated DL/T 645 meters for tests and test rigs.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a fleet (a fleet file, or quick flags for one bus)")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--fleet", metavar="FILE", help="fleet file (TOML); see README.md ## metersim")
    where.add_argument("--tcp", metavar="HOST:PORT", type=_arg(host_port), help="a TCP server (port 0: any)")
    where.add_argument("--pty", metavar="LINK", nargs="?", const="", help="a pty; optional symlink to it")
    where.add_argument("--serial", metavar="DEVICE", help="a real serial port")
    where.add_argument("--dtu", metavar="HOST:PORT", type=_arg(host_port), help="dial a gateway as a 4G DTU")
    where.add_argument("--mqtt", metavar="URL", help="raw frames over MQTT (mqtt://HOST[:PORT])")
    s.add_argument("--bus", metavar="NAME", help="the bus's name (default bus1)")
    s.add_argument("--meters", type=int, metavar="N", help="meters on the bus (default 1)")
    s.add_argument("--first-address", type=_arg(address_text), metavar="ADDR",
                   help="12 digits, the rest follow (default 000000000001)")
    s.add_argument("--edition", type=int, choices=(2007, 1997))
    s.add_argument("--baud", type=int, help="wire speed (default 2400; 0 = no wire emulation)")
    s.add_argument("--reply-delay-ms", type=_arg(_delay), metavar="MIN,MAX", help="reply delay (default 20,80)")
    s.add_argument("--parity", choices=("N", "E", "O"), help="serial parity (default E)")
    s.add_argument("--registration", metavar="TEXT", help="DTU registration packet (text or hex:...)")
    s.add_argument("--register-mode", choices=("once", "prefix", "both"))
    s.add_argument("--heartbeat", metavar="TEXT", help="DTU heartbeat packet (text or hex:...)")
    s.add_argument("--heartbeat-s", type=float, metavar="S", help="DTU heartbeat period (default 60)")
    s.add_argument("--request-topic", metavar="TOPIC")
    s.add_argument("--response-topic", metavar="TOPIC")
    s.add_argument("--hex", action="store_true", default=None, help="MQTT payloads as hex text")
    s.add_argument("--fault", action="append", default=[], metavar="KIND=VALUE",
                   help="KIND=PROBABILITY or KIND=ADDRESS (repeatable); see `metersim faults`")
    s.add_argument("--seed", type=int, help="fleet seed (default 0)")
    s.add_argument("--api", metavar="HOST:PORT", type=_arg(host_port), help="serve the HTTP API here")
    s.add_argument("--truth", metavar="FILE", help="write the ground truth (JSON) here on exit")
    s.add_argument("-v", "--verbose", action="count", default=0)
    sub.add_parser("faults", help="list the fault kinds")
    c = sub.add_parser("check", help="validate a fleet file")
    c.add_argument("fleet", metavar="FILE")
    return p


def _flag_faults(texts: list[str]) -> list[FaultSpec]:
    specs = []
    for text in texts:
        kind = text.partition("=")[0].strip()
        try:
            if kind not in KINDS:
                raise FaultError(f"unknown fault {kind!r}; known: {', '.join(sorted(KINDS))}")
            rule = FaultRule.from_flag(text)
            given = {k: v for k, v in rule.describe().items() if v is not None}
            specs.append(FaultSpec.model_validate(given))
        except FaultError as exc:
            raise FleetError(f"--fault {text}: {exc}") from None
        except ValidationError as exc:
            raise FleetError("\n".join(f"--fault {text}: {line}" for line in describe(exc))) from None
    return specs


def _quick_bus(a: argparse.Namespace) -> dict[str, Any]:
    bus: dict[str, Any] = {"name": a.bus or "bus1", "meters": a.meters if a.meters is not None else 1}
    for key in ("first_address", "edition", "baud", "reply_delay_ms", "parity"):
        if getattr(a, key) is not None:
            bus[key] = getattr(a, key)
    if a.tcp:
        bus["tcp"] = f"[{a.tcp[0]}]:{a.tcp[1]}" if ":" in a.tcp[0] else f"{a.tcp[0]}:{a.tcp[1]}"
    elif a.pty is not None:
        bus["pty"] = a.pty or True
    elif a.serial:
        bus["serial"] = a.serial
    elif a.dtu:
        dtu = {"host": a.dtu[0], "port": a.dtu[1], "registration": a.registration, "register_mode": a.register_mode,
               "heartbeat": a.heartbeat, "heartbeat_s": a.heartbeat_s}
        bus["dtu"] = {k: v for k, v in dtu.items() if v is not None}
    elif a.mqtt:
        mqtt = {"url": a.mqtt, "request_topic": a.request_topic, "response_topic": a.response_topic,
                "encoding": "hex" if a.hex else None}
        bus["mqtt"] = {k: v for k, v in mqtt.items() if v is not None}
    else:
        raise FleetError("give --fleet FILE or one exposure: --tcp, --pty, --serial, --dtu or --mqtt")
    return bus


def fleet_from_args(a: argparse.Namespace) -> FleetFile:
    """The fleet the flags describe: a fleet file (with --seed/--api/--fault on top) or one quick bus."""
    faults = _flag_faults(a.fault)
    if a.fleet:
        given = [f"--{k.replace('_', '-')}" for k in BUS_FLAGS if getattr(a, k) is not None]
        if given:
            raise FleetError(f"{', '.join(given)}: not with --fleet (set it in the fleet file)")
        spec = load(a.fleet)
    else:
        spec = parse({"buses": [_quick_bus(a)]}, "flags")
    update: dict[str, Any] = {"faults": [*spec.faults, *faults]}
    if a.seed is not None:
        update["seed"] = a.seed
    if a.api is not None:
        update["api"] = ApiSpec(listen=f"[{a.api[0]}]:{a.api[1]}" if ":" in a.api[0] else f"{a.api[0]}:{a.api[1]}")
    return spec.model_copy(update=update)


def _serve(a: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING - 10 * min(a.verbose, 2), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        fleet = build(fleet_from_args(a))
        truth = asyncio.run(serve_until_signalled(fleet, sys.stdout))
    except FleetError as exc:
        print(f"metersim: {exc}", file=sys.stderr)
        return 2
    except StartError as exc:
        print(f"metersim: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the signal handlers were in place (building a large fleet)
        print("metersim: interrupted before the fleet was ready", file=sys.stderr)
        return 130
    line = summary(truth)
    status = 0
    if a.truth:
        try:
            Path(a.truth).write_text(json.dumps(truth, indent=1, default=str) + "\n", encoding="utf-8")
            line += f"; written to {a.truth}"
        except OSError as exc:
            print(f"metersim: cannot write the truth file {a.truth}: {exc.strerror or exc}", file=sys.stderr)
            status = 1
    print(line, flush=True)
    return status


def _check(path: str) -> int:
    try:
        spec = load(path)
        buses = plan(spec)
    except FleetError as exc:
        print(f"metersim: {exc}", file=sys.stderr)
        return 2
    meters = sum(len(b.meters) for b in buses)
    print(f"{path}: {len(buses)} buses, {meters} meters, {len(spec.faults)} fault rules")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.command == "faults":
        width = max(map(len, KINDS))
        for kind, meaning in KINDS.items():
            print(f"{kind:<{width}}  {meaning}")
        return 0
    if a.command == "check":
        return _check(a.fleet)
    return _serve(a)


if __name__ == "__main__":
    sys.exit(main())
