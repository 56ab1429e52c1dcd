"""A fleet: the buses and meters a fleet file describes, one fault plan over all of them, and ground truth.

`load(path)` reads and validates a fleet file (`simulators.fleetfile` is the
schema); `FleetError` names the file and the key path of each problem.
`plan(spec)` expands the file (repeated buses, address ranges, per-meter
options over bus defaults) and checks what only the whole fleet can show:
unique bus names and addresses, faults that name a bus or meter that
exists. `build(spec, now=...)` then creates the meters and buses; it is
plain CPU work (about 40 µs a meter), done before the event loop serves.
"""

from __future__ import annotations

import datetime as dt
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from simulators.bus import Bus, Wire
from simulators.faults import FaultPlan, FaultRule
from simulators.fleetfile import TAGS, BusSpec, FaultSpec, FleetError, FleetFile, host_port, packet
from simulators.meter import Meter

DAY = 86400.0
TRUTH_KEYS = ("received", "answered", "delivered")


def describe(error: ValidationError) -> list[str]:
    """One line per problem: `key.path[0].name: what is wrong`."""
    lines = []
    for e in error.errors():
        path = ""
        for part in e["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif part not in TAGS:
                path += f".{part}" if path else str(part)
        kind, msg = e["type"], e["msg"].removeprefix("Value error, ")
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind == "missing":
            msg = "required key missing"
        elif kind != "value_error" and not isinstance(e["input"], dict | list):
            msg += f", got {e['input']!r}"
        lines.append(f"{path}: {msg}" if path else msg)
    return lines


def parse(data: dict[str, Any], source: str = "fleet") -> FleetFile:
    try:
        return FleetFile.model_validate(data)
    except ValidationError as exc:
        raise FleetError("\n".join(f"{source}: {line}" for line in describe(exc))) from None


def load(path: str | Path) -> FleetFile:
    """Read and validate a fleet file (call before the event loop runs: it reads the disk)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise FleetError(f"{path}: cannot read the fleet file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise FleetError(f"{path}: not UTF-8 text ({exc.reason})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FleetError(f"{path}: not valid TOML: {exc}") from None
    return parse(data, str(path))


@dataclass(frozen=True)
class Endpoint:
    """Where one bus is exposed: `kind` (tcp, pty, serial, dtu, mqtt) and the opener's keyword arguments."""

    kind: str
    options: dict[str, Any]


@dataclass
class BusPlan:
    name: str
    path: str  # "buses[2]" (copy 3 of a repeated bus: "buses[2] copy 3"), for messages
    spec: BusSpec
    endpoint: Endpoint
    meters: list[tuple[str, dict[str, Any], int | None]] = field(default_factory=list)  # address, options, seed


def _fill(text: str, bus: str, n: int) -> str:
    return text.replace("{n}", str(n)).replace("{bus}", bus)


def _endpoint(spec: BusSpec, bus: str, n: int) -> Endpoint:
    if spec.tcp is not None:
        host, port = host_port(spec.tcp)
        return Endpoint("tcp", {"host": host, "port": port + (n - 1 if port else 0)})
    if spec.pty is not None:
        return Endpoint("pty", {"link": _fill(spec.pty, bus, n) or None})
    if spec.serial is not None:
        return Endpoint("serial", {"device": _fill(spec.serial, bus, n), "baud": spec.baud, "parity": spec.parity})
    if spec.dtu is not None:
        d = spec.dtu
        return Endpoint("dtu", {"host": d.host, "port": d.port, "registration": packet(_fill(d.registration, bus, n)),
                                "register_mode": d.register_mode, "heartbeat": packet(_fill(d.heartbeat, bus, n)),
                                "heartbeat_s": d.heartbeat_s, "reconnect_min": d.reconnect_min,
                                "reconnect_max": d.reconnect_max})
    assert spec.mqtt is not None
    m = spec.mqtt
    return Endpoint("mqtt", {"url": m.url, "request_topic": _fill(m.request_topic, bus, n),
                             "response_topic": _fill(m.response_topic, bus, n), "encoding": m.encoding,
                             "reconnect_min": m.reconnect_min, "reconnect_max": m.reconnect_max})


def plan(spec: FleetFile) -> list[BusPlan]:
    """Expand the fleet file into buses with their meters; FleetError names the key of a conflict."""
    plans: list[BusPlan] = []
    owner: dict[str, str] = {}  # address -> bus name
    names: dict[str, str] = {}
    listens: dict[tuple[str, int], str] = {}
    for i, bus in enumerate(spec.buses):
        for n in range(1, bus.repeat + 1):
            path = f"buses[{i}]" + (f" copy {n}" if bus.repeat > 1 else "")
            name = bus.name if bus.repeat == 1 else (_fill(bus.name, bus.name, n) if "{n}" in bus.name
                                                        else f"{bus.name}-{n}")
            if name in names:
                raise FleetError(f"{path}.name: bus name {name!r} is already used by {names[name]}")
            names[name] = path
            item = BusPlan(name, path, bus, _endpoint(bus, name, n))
            if item.endpoint.kind == "tcp" and item.endpoint.options["port"]:
                key = (item.endpoint.options["host"], item.endpoint.options["port"])
                if key in listens:
                    raise FleetError(f"{path}.tcp: {key[0]}:{key[1]} is already used by bus {listens[key]}")
                listens[key] = name
            _add_meters(item, bus, n, owner)
            plans.append(item)
    for k, fault in enumerate(spec.faults):
        if fault.bus is not None and fault.bus not in names:
            raise FleetError(f"faults[{k}].bus: no bus named {fault.bus!r}")
        if fault.meter is not None and fault.meter not in owner:
            raise FleetError(f"faults[{k}].meter: no meter {fault.meter} in the fleet")
    return plans


def _add_meters(item: BusPlan, bus: BusSpec, n: int, owner: dict[str, str]) -> None:
    defaults = bus.options()
    groups: list[tuple[str, list[str], dict[str, Any]]] = []
    if isinstance(bus.meters, int):
        first = int(bus.first_address) + (n - 1) * bus.meters
        groups.append((f"{item.path}.meters", [f"{a:012d}" for a in range(first, first + bus.meters)], defaults))
    else:
        for j, entry in enumerate(bus.meters):
            groups.append((f"{item.path}.meters[{j}]", entry.addresses(), {**defaults, **entry.options()}))
    for path, addresses, options in groups:
        seed = options.pop("seed", None)
        for k, address in enumerate(addresses):
            if address in owner:
                raise FleetError(f"{path}: address {address} is already on bus {owner[address]}")
            owner[address] = item.name
            item.meters.append((address, options, None if seed is None else seed + k))


class Fleet:
    """The running fleet's buses and meters, its one fault plan, and the ground truth."""

    def __init__(self, buses: list[Bus], endpoints: dict[str, Endpoint], faults: FaultPlan, *,
                 api: tuple[str, int] | None = None, tz_offset_s: float = 8 * 3600) -> None:
        self.buses = buses
        self.tz_offset_s = tz_offset_s
        self.endpoints = endpoints
        self.faults = faults
        self.api = api
        self._where: dict[str, Bus] = {a: b for b in buses for a in b.meters}

    @property
    def size(self) -> int:
        return sum(len(b.meters) for b in self.buses)

    def bus(self, name: str) -> Bus | None:
        return next((b for b in self.buses if b.name == name), None)

    def locate(self, address: str) -> tuple[Meter, Bus] | None:
        """The meter with this address now (a write-address request may have moved it) and its bus."""
        bus = self._where.get(address)
        meter = bus.meters.get(address) if bus is not None else None
        if meter is not None and bus is not None and meter.address == address:
            return meter, bus
        for bus in self.buses:
            for meter in bus.meters.values():
                if meter.address == address:
                    self._where[address] = bus
                    return meter, bus
        return None

    def meters(self) -> list[tuple[Meter, Bus]]:
        return [(m, b) for b in self.buses for m in b.meters.values()]

    def faults_of(self, meter: Meter, bus: Bus) -> list[FaultRule]:
        return [r for r in self.faults.rules if r.bus in (None, bus.name) and r.meter in (None, meter.address)]

    def truth(self, now: float, bus: str | None = None) -> dict[str, Any]:
        """Ground truth: per meter its counters and relay, per bus the bus's counters, and fleet totals."""
        meters: dict[str, Any] = {}
        totals: Counter[str] = Counter()
        buses: dict[str, Any] = {}
        for b in self.buses:
            if bus is not None and b.name != bus:
                continue
            buses[b.name] = {"meters": len(b.meters), **b.truth}
            totals.update(b.truth)
            for m in b.meters.values():
                m.relay.settle(m, now)
                r = m.relay
                meters[m.address] = {"bus": b.name, **dict.fromkeys(TRUTH_KEYS, 0), **m.truth,
                                     "relay": {"open": r.is_open, "trip_command": r.trip_command, "hold": r.hold,
                                               "alarm": r.alarm}}
                totals.update({f"meter_{k}": v for k, v in m.truth.items()})
        return {"time": now, "meters": meters, "buses": buses, "totals": dict(sorted(totals.items()))}


def fault_rule(spec: FaultSpec, *, started: float, tz_offset_s: float) -> FaultRule:
    """A validated fault spec as a rule; `after_s`/`for_s` count from `started`, naive date-times are local."""

    def utc(value: float | dt.datetime | None) -> float | None:
        if isinstance(value, dt.datetime):
            if value.tzinfo is None:
                return (value - dt.datetime(1970, 1, 1)).total_seconds() - tz_offset_s
            return value.timestamp()
        return value

    start = utc(spec.start) if spec.after_s is None else started + spec.after_s
    end = utc(spec.end) if spec.for_s is None else (start if start is not None else started) + spec.for_s
    params = {k: float(v) for k in ("delay_s", "bytes") if (v := getattr(spec, k)) is not None}
    return FaultRule(spec.kind, spec.probability, spec.every, spec.bus, spec.meter, start, end, params)


def build(spec: FleetFile, *, now: float | None = None, clock: Callable[[], float] = time.time) -> Fleet:
    """Create every meter and bus of the fleet (no I/O; exposures are opened by `simulators.serve`)."""
    now = clock() if now is None else now
    tz = spec.timezone_offset_h * 3600
    epoch = (now // DAY - spec.history_days) * DAY
    plans = plan(spec)
    rules = [fault_rule(f, started=now, tz_offset_s=tz) for f in spec.faults]
    buses: list[Bus] = []
    for index, p in enumerate(plans):
        s = p.spec
        meters, preamble = [], {}
        for address, options, seed in p.meters:
            meter = _meter(address, options, seed, spec, baud=s.baud, tz=tz, epoch=epoch, now=now)
            meters.append(meter)
            if options.get("preamble"):
                preamble[address] = options["preamble"]
        on_wire = s.request_on_wire if s.request_on_wire is not None else p.endpoint.kind != "serial"
        wire = Wire(baud=s.baud, delay_min=s.reply_delay_ms[0] / 1000, delay_max=s.reply_delay_ms[1] / 1000,
                    request_on_wire=on_wire, gap=s.gap_ms / 1000)
        buses.append(Bus(p.name, meters, wire, seed=spec.seed * 1_000_003 + index, clock=clock, preamble=preamble))
    faults = FaultPlan(rules, seed=spec.seed)
    for bus in buses:
        bus.faults = faults  # one plan: rules are scoped by bus and meter name
    api = host_port(spec.api.listen) if spec.api is not None else None
    return Fleet(buses, {p.name: p.endpoint for p in plans}, faults, api=api, tz_offset_s=tz)


def _meter(address: str, o: dict[str, Any], seed: int | None, spec: FleetFile, *, baud: int, tz: float,
           epoch: float, now: float) -> Meter:
    if seed is None:
        seed = int(address) + spec.seed * 1_000_000_000_000
    meter = Meter(address, edition=o.get("edition", 2007), seed=seed, phases=o.get("phases", 1),
                  tariffs=o.get("tariffs", 4), baud=baud or 2400, passwords=o.get("passwords"),
                  prepaid=o.get("prepaid", True), price=o.get("price", 0.5), balance=o.get("balance", 100.0),
                  trip_delay_s=o.get("trip_delay_s", 0), tz_offset_s=tz, epoch=epoch, now=now)
    meter.clock_offset_s = o.get("clock_offset_s", 0.0)
    meter.drift_ppm = o.get("drift_ppm", 0.0)
    if "load_kw" in o:
        meter.set_load(o["load_kw"], now)
    return meter
