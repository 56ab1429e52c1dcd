"""Link configuration: pydantic models (one per kind, a union on `kind`) and `build_link`.

Byte patterns (registration match, heartbeat) are written `hex:68 AA 01`,
`text:REG:0001` or `regex:^REG:(?P<id>\\d+)`. Every link also carries the
bus settings (timeouts, gap, retries, preamble, degradation, trace); a
timeout left out takes the default of the link's kind
(`first_byte_timeout_s`, `inter_byte_timeout_s`).
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, field_validator, model_validator

from gateway.links.base import Link
from gateway.links.listener import MAX_UNIDENTIFIED_BYTES, Listener
from gateway.links.mqtt import MqttLink
from gateway.links.serial import SerialLink
from gateway.links.tcp import Matcher, TcpLink

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]
MODES = ("once", "prefix", "both")  # "both" (on connect and as prefix) is handled as "prefix"


def parse_pattern(text: str) -> Matcher:
    """`hex:...` or `text:...` (exact bytes) or `regex:...` (a bytes regex)."""
    scheme, sep, body = text.partition(":")
    if not sep or scheme not in ("hex", "text", "regex"):
        raise ValueError(f"expected 'hex:...', 'text:...' or 'regex:...', got {text!r}")
    if not body:
        raise ValueError(f"{scheme}: pattern is empty")
    if scheme == "text":
        return body.encode()
    if scheme == "hex":
        try:
            return bytes.fromhex("".join(body.split()))
        except ValueError as exc:
            raise ValueError(f"not hex: {body!r}") from exc
    try:
        return re.compile(body.encode())
    except re.error as exc:
        raise ValueError(f"bad regex {body!r}: {exc}") from exc


@dataclass(frozen=True)
class RegistrationRule:
    """Exact `match` bytes; or `length` bytes (starting with `match` bytes if given); or a regex `match`
    (identity: group "id", else group 1, else the whole match). `mode`: "once" (first packet) or
    "prefix"/"both" (in front of every packet, stripped)."""

    match: Matcher | None = None
    length: int | None = None
    mode: str = "once"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"registration mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.match is None and self.length is None:
            raise ValueError("a registration needs match bytes, a regex or a length")
        if self.match == b"":
            raise ValueError("registration match bytes must not be empty")
        if isinstance(self.match, re.Pattern) and self.length is not None:
            raise ValueError("a registration regex and a length cannot be combined")
        if self.length is not None and not 1 <= self.length <= MAX_UNIDENTIFIED_BYTES:
            raise ValueError(f"registration length must be 1..{MAX_UNIDENTIFIED_BYTES}, got {self.length}")
        if isinstance(self.match, bytes) and self.length is not None and len(self.match) > self.length:
            raise ValueError("registration match bytes are longer than the registration length")

    @property
    def prefix(self) -> bool:
        return self.mode != "once"

    def find(self, buf: bytes) -> tuple[int, bytes] | None:
        """(size of the registration at the start of `buf`, identity bytes); None: more bytes needed.
        Raises ValueError when `buf` can never start with a registration."""
        match = self.match
        if isinstance(match, re.Pattern):
            found = match.match(buf)
            if found is None or found.end() == 0:
                return None  # a regex cannot say "never": the size and time limits decide
            ident = found.group("id") if "id" in match.groupindex else found.group(1) if match.groups else b""
            return found.end(), ident or found.group(0)
        if match is not None:
            if not match.startswith(buf[: len(match)]):
                raise ValueError(f"not a registration packet: {buf[:40]!r}")
            if len(buf) < len(match):
                return None
        size = self.length or len(match or b"")
        return (size, buf[:size]) if len(buf) >= size else None


class LinkSettings(BaseModel):
    """What every link kind has: its name, reconnect backoff, and the bus settings for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    first_byte_default: ClassVar[float] = 1.0
    inter_byte_default: ClassVar[float] = 0.5

    name: Name
    first_byte_timeout: Seconds | None = None
    inter_byte_timeout: Seconds | None = None
    gap: Annotated[float, Field(ge=0)] = 0.02
    retries: Annotated[int, Field(ge=0, le=10)] = 1
    preamble: Annotated[int, Field(ge=0, le=16)] = 4
    degrade_after: Annotated[int, Field(ge=1)] = 3
    trace: bool = False
    reconnect_min: Seconds = 0.5
    reconnect_max: Seconds = 30.0

    @model_validator(mode="after")
    def _backoff_order(self) -> LinkSettings:
        if self.reconnect_max < self.reconnect_min:
            raise ValueError(f"reconnect_max ({self.reconnect_max}) is below reconnect_min ({self.reconnect_min})")
        return self

    @property
    def first_byte_timeout_s(self) -> float:
        return self.first_byte_timeout or self.first_byte_default

    @property
    def inter_byte_timeout_s(self) -> float:
        return self.inter_byte_timeout or self.inter_byte_default


class SerialConfig(LinkSettings):
    inter_byte_default: ClassVar[float] = 0.1

    kind: Literal["serial"] = "serial"
    port: Annotated[str, StringConstraints(min_length=1)]
    baud: Annotated[int, Field(gt=0, le=921600)] = 2400
    parity: Literal["N", "E", "O", "M", "S"] = "E"
    bytesize: Literal[5, 6, 7, 8] = 8
    stopbits: float = 1

    @field_validator("stopbits")
    @classmethod
    def _stopbits(cls, value: float) -> float:
        if value not in (1, 1.5, 2):
            raise ValueError(f"stopbits must be 1, 1.5 or 2, got {value:g}")
        return value


class TcpConfig(LinkSettings):
    kind: Literal["tcp"] = "tcp"
    host: Annotated[str, StringConstraints(min_length=1)]
    port: Port
    connect_timeout: Seconds = 5.0


class RegistrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    match: str | None = None
    length: int | None = None
    mode: Literal["once", "prefix", "both"] = "once"

    @model_validator(mode="after")
    def _compiles(self) -> RegistrationConfig:
        self.rule()
        return self

    def rule(self) -> RegistrationRule:
        match = parse_pattern(self.match) if self.match is not None else None
        return RegistrationRule(match, self.length, self.mode)


class ListenConfig(LinkSettings):
    first_byte_default: ClassVar[float] = 10.0

    kind: Literal["tcp-listen"] = "tcp-listen"
    listen: str = "0.0.0.0:9100"
    identify: Literal["registration", "address"]
    registration: RegistrationConfig | None = None
    heartbeat: str | None = None
    probe_after: Seconds | None = 2.0
    identify_timeout: Seconds = 30.0

    @model_validator(mode="before")
    @classmethod
    def _default_identify(cls, data: Any) -> Any:
        if isinstance(data, dict) and "identify" not in data:
            return {**data, "identify": "registration" if data.get("registration") else "address"}
        return data

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"expected HOST:PORT (port 1..65535), got {value!r}")
        return value

    @field_validator("heartbeat")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None:
            parse_pattern(value)
        return value

    @model_validator(mode="after")
    def _needs_registration(self) -> ListenConfig:
        if self.identify == "registration" and self.registration is None:
            raise ValueError("identify = 'registration' needs a [registration] (match and/or length)")
        if self.identify == "address" and self.registration is not None:
            raise ValueError("identify = 'address' takes no [registration] (it would not be stripped)")
        return self

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class MqttConfig(LinkSettings):
    first_byte_default: ClassVar[float] = 10.0

    kind: Literal["mqtt"] = "mqtt"
    url: str
    request_topic: Annotated[str, StringConstraints(min_length=1)]
    response_topic: Annotated[str, StringConstraints(min_length=1)]
    encoding: Literal["binary", "hex"] = "binary"
    client_id: str | None = None

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        parts = urllib.parse.urlsplit(value)
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port in {value!r}") from exc
        if parts.scheme != "mqtt" or not parts.hostname or (port is not None and port == 0):
            raise ValueError(f"expected mqtt://[USER:PASS@]HOST[:PORT], got {value!r}")
        return value

    @field_validator("request_topic")
    @classmethod
    def _no_wildcards(cls, value: str) -> str:
        if "+" in value or "#" in value:
            raise ValueError(f"a topic to publish on cannot hold wildcards: {value!r}")
        return value


LinkConfig = Annotated[SerialConfig | TcpConfig | ListenConfig | MqttConfig, Field(discriminator="kind")]
LINK_CONFIG: TypeAdapter[SerialConfig | TcpConfig | ListenConfig | MqttConfig] = TypeAdapter(LinkConfig)


def parse_link(data: dict[str, Any]) -> SerialConfig | TcpConfig | ListenConfig | MqttConfig:
    """One link's table from the config file; raises pydantic.ValidationError."""
    return LINK_CONFIG.validate_python(data)


def build_link(cfg: SerialConfig | TcpConfig | ListenConfig | MqttConfig) -> Link | Listener:
    """The link (or listener) a validated config describes; nothing is opened until its `run()`."""
    lo, hi = cfg.reconnect_min, cfg.reconnect_max
    if isinstance(cfg, SerialConfig):
        return SerialLink(cfg.name, cfg.port, baud=cfg.baud, parity=cfg.parity, bytesize=cfg.bytesize,
                          stopbits=cfg.stopbits, reconnect_min=lo, reconnect_max=hi)
    if isinstance(cfg, TcpConfig):
        return TcpLink(cfg.name, cfg.host, cfg.port, cfg.connect_timeout, reconnect_min=lo, reconnect_max=hi)
    if isinstance(cfg, MqttConfig):
        return MqttLink(cfg.name, cfg.url, cfg.request_topic, cfg.response_topic, encoding=cfg.encoding,
                        client_id=cfg.client_id, reconnect_min=lo, reconnect_max=hi)
    return Listener(cfg.name, cfg.host, cfg.port, identify=cfg.identify,
                    registration=cfg.registration.rule() if cfg.registration is not None else None,
                    heartbeat=parse_pattern(cfg.heartbeat) if cfg.heartbeat is not None else None,
                    probe_after=cfg.probe_after, identify_timeout=cfg.identify_timeout,
                    reconnect_min=lo, reconnect_max=hi)
