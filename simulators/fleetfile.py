"""The fleet file (TOML): buses, their exposure, their meters and the faults, validated with readable errors.

The pydantic models here are the schema; `simulators.fleet.load` reads a
file through them and reports every problem with its key path
(`buses[1].meters[0].edition: ...`). The reference for every key is in
README.md (## metersim); config/fleet-*.toml are worked examples.
"""

from __future__ import annotations

import binascii
import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from simulators.faults import KINDS

LAST_ADDRESS = 999_999_999_999
EXPOSURES = ("tcp", "pty", "serial", "dtu", "mqtt")
TAGS = ("meters=N", "[[meters]]")  # union tags of `meters`, left out of key paths


class FleetError(Exception):
    """A fleet file or fleet flags that cannot be used; the message says where and what."""


# --- small value checks shared with the command line and the API ------------------------------------
def address_text(value: object) -> str:
    """A 12-digit meter address (an int is zero-padded)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= LAST_ADDRESS:
        return f"{value:012d}"
    if isinstance(value, str) and len(value) == 12 and value.isdigit():
        return value
    raise ValueError(f"a meter address is 12 decimal digits, got {value!r}")


def host_port(text: object) -> tuple[str, int]:
    """'127.0.0.1:9000' or '[::1]:0' -> (host, port)."""
    if isinstance(text, str):
        host, sep, port = text.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if sep and host and port.isdigit() and int(port) <= 65535:
            return host, int(port)
    raise ValueError(f"expected HOST:PORT, got {text!r}")


def packet(text: str) -> bytes:
    """A DTU registration/heartbeat packet: plain text, or 'hex:...' for raw bytes."""
    if text.startswith("hex:"):
        try:
            return bytes.fromhex(text[4:])
        except (ValueError, binascii.Error) as exc:
            raise ValueError(f"not valid hex after 'hex:': {text[4:]!r}") from exc
    return text.encode()


def _hostport(value: object) -> str:
    host_port(value)
    return str(value)


def _packet(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"text or 'hex:...' expected, got {value!r}")
    packet(value)
    return value


def _moment(value: object) -> object:
    if isinstance(value, dt.datetime) or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    raise ValueError(f"a time is UTC seconds or a TOML date-time, got {value!r}")


Address = Annotated[str, BeforeValidator(address_text)]
HostPort = Annotated[str, BeforeValidator(_hostport)]
Packet = Annotated[str, BeforeValidator(_packet)]
Moment = Annotated[float | dt.datetime, BeforeValidator(_moment)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.{}-]+$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class MeterOptions(_Model):
    """What a meter can be told; on a bus these are defaults for its meters, on an entry they override."""

    edition: Literal[2007, 1997] | None = None
    phases: Literal[1, 3] | None = None
    tariffs: Annotated[int, Field(ge=1, le=4)] | None = None
    passwords: dict[int, str] | None = None
    prepaid: bool | None = None
    price: Annotated[float, Field(ge=0)] | None = None
    balance: float | None = None
    trip_delay_s: Annotated[int, Field(ge=0)] | None = None
    preamble: Annotated[int, Field(ge=0, le=16)] | None = None
    clock_offset_s: float | None = None
    drift_ppm: Annotated[float, Field(ge=-100_000, le=100_000)] | None = None
    seed: int | None = None
    load_kw: Annotated[float, Field(ge=0)] | None = None

    @field_validator("passwords", mode="before")
    @classmethod
    def _passwords(cls, value: object) -> object:
        if not isinstance(value, dict):
            raise ValueError("a table {level = \"password\"} expected, e.g. {2 = \"123456\"}")
        out: dict[int, str] = {}
        for level, password in value.items():
            if not (str(level).isdigit() and int(level) <= 99):
                raise ValueError(f"password level must be 0..99, got {level!r}")
            if not (isinstance(password, str) and len(password) == 6 and password.isdigit()):
                raise ValueError(f"password for level {level} must be 6 digits, got {password!r}")
            out[int(level)] = password
        return out

    def options(self) -> dict[str, Any]:
        return self.model_dump(include=set(MeterOptions.model_fields), exclude_none=True)


class MeterEntry(MeterOptions):
    """One meter (`address`) or a range (`from` and `count`) with its own options."""

    address: Address | None = None
    from_: Address | None = Field(None, alias="from")
    count: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> MeterEntry:
        if (self.address is None) == (self.from_ is None):
            raise ValueError("give either address or from (+ count)")
        if self.count is not None and self.address is not None:
            raise ValueError("count goes with from, not with address")
        return self

    def addresses(self) -> list[str]:
        if self.address is not None:
            return [self.address]
        first = int(self.from_ or 0)
        return [f"{a:012d}" for a in range(first, first + (self.count or 1))]


class _Redial(_Model):
    """How a client exposure (DTU, MQTT) redials: capped exponential backoff in seconds, as in the field."""

    reconnect_min: Annotated[float, Field(gt=0)] = 1.0
    reconnect_max: Annotated[float, Field(gt=0)] = 30.0

    @model_validator(mode="after")
    def _order(self) -> _Redial:
        if self.reconnect_max < self.reconnect_min:
            raise ValueError(f"reconnect_max ({self.reconnect_max:g}) is below reconnect_min ({self.reconnect_min:g})")
        return self


class DtuSpec(_Redial):
    host: Annotated[str, Field(min_length=1)]
    port: Annotated[int, Field(ge=1, le=65535)]
    registration: Packet = ""
    register_mode: Literal["once", "prefix", "both"] = "once"
    heartbeat: Packet = ""
    heartbeat_s: Annotated[float, Field(gt=0)] = 60.0


class MqttSpec(_Redial):
    url: Annotated[str, Field(pattern=r"^mqtt://[^/]+")]
    request_topic: Annotated[str, Field(min_length=1)] = "metersim/{bus}/request"
    response_topic: Annotated[str, Field(min_length=1)] = "metersim/{bus}/response"
    encoding: Literal["binary", "hex"] = "binary"


def _meters_form(value: object) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return TAGS[0]
    return TAGS[1] if isinstance(value, list) else None


MeterList = Annotated[
    Annotated[Annotated[int, Field(ge=1)], Tag(TAGS[0])] | Annotated[list[MeterEntry], Tag(TAGS[1])],
    Discriminator(_meters_form, custom_error_type="meters_form",
                  custom_error_message="a number of meters or [[buses.meters]] entries expected"),
]


class BusSpec(MeterOptions):
    name: Name
    baud: int = 2400
    reply_delay_ms: tuple[float, float] = (20.0, 80.0)
    gap_ms: Annotated[float, Field(ge=0)] = 0.0
    request_on_wire: bool | None = None
    tcp: HostPort | None = None
    pty: str | None = None
    serial: Annotated[str, Field(min_length=1)] | None = None
    parity: Literal["N", "E", "O"] = "E"
    dtu: DtuSpec | None = None
    mqtt: MqttSpec | None = None
    meters: MeterList
    first_address: Address = "000000000001"
    repeat: Annotated[int, Field(ge=1)] = 1

    @field_validator("baud")
    @classmethod
    def _baud(cls, value: int) -> int:
        if value != 0 and not 300 <= value <= 115200:
            raise ValueError(f"baud must be 0 (no wire emulation) or 300..115200, got {value}")
        return value

    @field_validator("reply_delay_ms", mode="before")
    @classmethod
    def _delay(cls, value: object) -> object:
        if isinstance(value, list | tuple) and len(value) == 2:
            low, high = value
            numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high))
            if numbers and 0 <= low <= high:
                return (float(low), float(high))
        raise ValueError(f"[min, max] in ms with 0 <= min <= max expected, got {value!r}")

    @field_validator("pty", mode="before")
    @classmethod
    def _pty(cls, value: object) -> object:
        if value is True:
            return ""  # a new pty, no link
        if isinstance(value, str) and value:
            return value
        raise ValueError(f"true or a link path expected, got {value!r}")

    @model_validator(mode="after")
    def _consistent(self) -> BusSpec:
        given = [k for k in EXPOSURES if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"one exposure per bus ({', '.join(EXPOSURES)}); "
                             + (f"got {' and '.join(given)}" if given else "none given"))
        if self.serial is not None and self.baud == 0:
            raise ValueError("a real serial port needs a baud rate, not 0")
        entries = isinstance(self.meters, list)
        if entries and "first_address" in self.model_fields_set:
            raise ValueError("first_address goes with meters = N, not with [[buses.meters]] entries")
        if self.repeat > 1:
            self._check_repeat(entries)
        if isinstance(self.meters, int) and int(self.first_address) + self.repeat * self.meters - 1 > LAST_ADDRESS:
            raise ValueError(f"addresses from {self.first_address} run past {LAST_ADDRESS}")
        return self

    def _check_repeat(self, entries: bool) -> None:
        if entries:
            raise ValueError("repeat needs meters = N (each copy takes the next addresses)")
        if self.serial is not None and "{n}" not in self.serial:
            raise ValueError("repeat with serial needs {n} in the device path")
        if self.pty and "{n}" not in self.pty:
            raise ValueError("repeat with a pty link needs {n} in the link path")
        if self.mqtt is not None and not all(("{n}" in t or "{bus}" in t)
                                             for t in (self.mqtt.request_topic, self.mqtt.response_topic)):
            raise ValueError("repeat with mqtt needs {bus} or {n} in both topics")


class FaultSpec(_Model):
    """A `[[faults]]` rule (also the body of `PUT /faults`); becomes a `faults.FaultRule`."""

    kind: str
    probability: Annotated[float, Field(ge=0, le=1)] = 1.0
    every: Annotated[int, Field(ge=1)] | None = None
    bus: str | None = None
    meter: Address | None = None
    start: Moment | None = None
    end: Moment | None = None
    after_s: Annotated[float, Field(ge=0)] | None = None
    for_s: Annotated[float, Field(gt=0)] | None = None
    delay_s: Annotated[float, Field(gt=0)] | None = None
    bytes: Annotated[int, Field(ge=1, le=4096)] | None = None

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        if value not in KINDS:
            raise ValueError(f"unknown fault kind {value!r}; known: {', '.join(sorted(KINDS))}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FaultSpec:
        if self.start is not None and self.after_s is not None:
            raise ValueError("give start or after_s, not both")
        if self.end is not None and self.for_s is not None:
            raise ValueError("give end or for_s, not both")
        if self.delay_s is not None and self.kind != "late_reply":
            raise ValueError("delay_s goes with late_reply")
        if self.bytes is not None and self.kind != "garbage":
            raise ValueError("bytes goes with garbage")
        return self


class ApiSpec(_Model):
    listen: HostPort = "127.0.0.1:8080"


class FleetFile(_Model):
    seed: int = 0
    timezone_offset_h: Annotated[float, Field(ge=-12, le=14)] = 8.0
    history_days: Annotated[int, Field(ge=0, le=3650)] = 70
    api: ApiSpec | None = None
    buses: Annotated[list[BusSpec], Field(min_length=1)]
    faults: list[FaultSpec] = []
