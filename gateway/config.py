"""The daemon's configuration: one TOML file (plus an optional meter archive CSV), validated up front.

Errors name the file, the key path (and the line for syntax errors) and
what is wrong, so `meterd check-config` is useful on a station at 3 a.m.
Validation never touches hardware or the network.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from gateway.api import ApiConfig
from gateway.archive import ArchiveError, MeterConfig, load_csv
from gateway.control.config import ControlConfig
from gateway.control.secrets import SecretsError, load_groups
from gateway.journal import JournalConfig
from gateway.links.config import LinkConfig
from gateway.plans import PlanConfig, parse_duration
from gateway.prepaid.config import PrepaidConfig
from gateway.sinks import SinkConfig
from protocols.dlt645 import find


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says where and why."""


class StationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    timezone: str = "Asia/Shanghai"
    state_dir: Path = Path("/var/lib/meterd")

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {value!r} (e.g. Asia/Shanghai)") from exc
        return value


class TimeSyncConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    at: dt.time | None = None  # daily broadcast time sync (local); None = never
    drift_threshold: float = 60.0  # s: meters whose clock is further off are reported
    # s between clock reads of each meter; None = no drift check (it adds traffic between rounds)
    check_every: float | None = None

    @field_validator("drift_threshold", "check_every", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, str) else value


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # never echo a password back

    station: StationConfig
    archive: Path | None = None
    api: ApiConfig = ApiConfig()
    journal: JournalConfig = JournalConfig()
    links: list[LinkConfig] = []
    meters: list[MeterConfig] = []
    plans: list[PlanConfig] = []
    sinks: list[SinkConfig] = []
    time_sync: TimeSyncConfig = TimeSyncConfig()
    _by_address: dict[str, MeterConfig] | None = PrivateAttr(default=None)
    control: ControlConfig = ControlConfig()
    prepaid: PrepaidConfig = PrepaidConfig()

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.station.timezone)

    def plan_meters(self, plan: PlanConfig) -> list[MeterConfig]:
        chosen = set(plan.meters)
        return [m for m in self.meters
                if (not chosen or m.address in chosen) and (not plan.links or m.link in plan.links)
                and (not plan.areas or m.area in plan.areas)]

    def meter(self, address: str) -> MeterConfig | None:
        """The meter with this address (an index built on first use; a reload makes a new Config)."""
        index = self._by_address
        if index is None or len(index) != len(self.meters):
            index = self._by_address = {m.address: m for m in self.meters}
        return index.get(address)

    def link(self, name: str) -> LinkConfig:
        return next(link for link in self.links if link.name == name)


def _where(loc: tuple[int | str, ...], data: dict[str, Any]) -> str:
    """A pydantic location as a readable key path: links[2].port, with the link's name when it has one."""
    parts: list[str] = []
    node: Any = data
    for part in loc:
        if isinstance(part, int):
            entry = node[part] if isinstance(node, list) and part < len(node) else None
            label = (entry.get("name") or entry.get("address")) if isinstance(entry, dict) else None
            if parts:
                parts[-1] += f"[{part}]" + (f" ({label})" if label else "")
            node = entry
            continue
        if part in {"serial", "tcp", "tcp-listen", "mqtt", "influxdb"} and isinstance(node, dict) and part not in node:
            continue  # a discriminated union's tag, not a key the user wrote
        parts.append(str(part))
        node = node.get(part) if isinstance(node, dict) else None
    return ".".join(parts)


def load_config(path: Path) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax: {exc}") from exc
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path}: {_where(e['loc'], data)}: {e['msg']}" for e in exc.errors()[:10]]
        raise ConfigError("\n".join(lines)) from exc
    if config.archive is not None:
        archive = config.archive if config.archive.is_absolute() else path.parent / config.archive
        try:
            config.meters = [*config.meters, *load_csv(archive)]
        except ArchiveError as exc:
            raise ConfigError(str(exc)) from exc
    secrets = config.control.secrets_file
    if secrets is not None and not secrets.is_absolute():
        config.control = config.control.model_copy(update={"secrets_file": path.parent / secrets})
    if not config.station.state_dir.is_absolute():
        config.station.state_dir = (path.parent / config.station.state_dir).resolve()
    check(config, path)
    return config


def check(config: Config, path: Path) -> None:
    """Cross-references pydantic cannot see: names that must exist, duplicates, items per edition."""
    problems: list[str] = []
    links = [link.name for link in config.links]
    problems += [f"links: duplicate name {n!r}" for n in sorted({n for n in links if links.count(n) > 1})]
    seen: set[str] = set()
    for i, meter in enumerate(config.meters):
        if meter.address in seen:
            problems.append(f"meters[{i}]: duplicate address {meter.address}")
        seen.add(meter.address)
        if meter.link not in links:
            problems.append(f"meters[{i}] ({meter.address}): unknown link {meter.link!r}; links are {links}")
    plans = [p.name for p in config.plans]
    problems += [f"plans: duplicate name {n!r}" for n in sorted({n for n in plans if plans.count(n) > 1})]
    for plan in config.plans:
        problems += [f"plans ({plan.name}): unknown link {n!r}" for n in plan.links if n not in links]
        problems += [f"plans ({plan.name}): unknown meter {a!r}" for a in plan.meters if a not in seen]
        for edition in sorted({m.edition for m in config.plan_meters(plan)}):
            for item in plan.items:
                try:
                    find(item, edition)
                except KeyError:
                    problems.append(f"plans ({plan.name}).items: {item!r} is not in the DL/T 645-{edition} table")
    try:
        load_groups(config.control)  # the secrets file too: a station should not learn of a typo at the first trip
    except SecretsError as exc:
        problems.append(f"control: {exc}")
    sinks = [s.name for s in config.sinks]
    problems += [f"sinks: duplicate name {n!r}" for n in sorted({n for n in sinks if sinks.count(n) > 1})]
    if problems:
        raise ConfigError("\n".join(f"{path}: {p}" for p in problems))
