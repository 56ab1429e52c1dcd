"""`[control]` in the config: guards, timings and the password groups of remote control.

Durations accept "90s", "5m", "1h" like the rest of the config. Passwords live in
`GroupAuth` as `SecretStr`, so a repr, a log line or a config dump never shows one;
`secrets.py` turns the groups (and the secrets file) into `Auth` per meter.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from gateway.control.inbox import InboxConfig
from gateway.plans import parse_duration
from protocols.dlt645 import AddressError, normalize

_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
DURATIONS = ("default_valid_for", "max_valid_for", "verify_timeout", "retry_every", "trip_retry_every",
             "verify_poll_first", "verify_poll_max")


def parse_clock(text: str) -> dt.time:
    """'20:00' -> time(20, 0); a clear error for anything else."""
    match = _CLOCK.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a time of day (HH:MM, 00:00..23:59)")
    return dt.time(int(match[1]), int(match[2]))


def parse_window(text: str) -> tuple[dt.time, dt.time]:
    """'20:00-08:00' -> (start, end); the window may wrap midnight but may not be empty."""
    parts = text.split("-")
    if len(parts) != 2:
        raise ValueError(f"quiet_hours {text!r} must look like 20:00-08:00")
    start, end = parse_clock(parts[0]), parse_clock(parts[1])
    if start == end:
        raise ValueError(f"quiet_hours {text!r} is empty: start and end are the same")
    return start, end


class GroupAuth(BaseModel):
    """One password group: PA level, 6-digit password, 8-digit operator code.

    The password may come from the secrets file instead of the main config.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)  # errors never echo a password

    level: int = Field(default=2, ge=0, le=99)
    password: SecretStr | None = None
    operator: str = "00000000"

    @field_validator("password")
    @classmethod
    def _password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            text = value.get_secret_value()
            if len(text) != 6 or not (text.isascii() and text.isdigit()):
                raise ValueError("the password must be 6 digits")  # never echo the value
        return value

    @field_validator("operator")
    @classmethod
    def _operator(cls, value: str) -> str:
        if len(value) != 8 or not (value.isascii() and value.isdigit()):
            raise ValueError(f"the operator code must be 8 digits, got {value!r}")
        return value


class ControlConfig(BaseModel):
    """Remote control: validity, verification, retries, guards, dry run and password groups."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # a group's password is an input

    dry_run: bool = False  # record and guard everything, send nothing
    default_valid_for: float = 3600.0  # s from submission to the command's deadline
    max_valid_for: float = 7 * 86400.0
    verify_timeout: float = 300.0  # s after the 9C during which status word 3 is polled
    verify_poll_first: float = 1.0  # s: first verification poll, then doubling ...
    verify_poll_max: float = 30.0  # ... up to this
    retry_every: float = 5.0  # s between attempts of a restore while the meter cannot be reached
    trip_retry_every: float = 30.0  # s between attempts of a trip
    quiet_hours: str | None = "20:00-08:00"  # local station time, may wrap midnight; None or "" = off
    holidays: list[dt.date] = []  # whole days without trips
    # refuse: a trip submitted in quiet hours fails at once; defer: it waits for them to end (or expires).
    # Either way a trip that runs into quiet hours while waiting (link down) is not sent until they end.
    quiet_mode: Literal["refuse", "defer"] = "refuse"
    trip_rate_per_min: int = Field(default=30, ge=1)  # trips per station in any 60 s window
    rate_mode: Literal["defer", "refuse"] = "defer"
    hold_list: list[str] = []  # meters never tripped (保电)
    groups: dict[str, GroupAuth] = {}
    secrets_file: Path | None = None  # TOML with [groups.<name>] tables; its values win
    n2: int = Field(default=0, ge=0, le=255)  # N2 of the 1C payload (reserved; one vendor wants 1)
    mqtt: InboxConfig | None = None  # commands in over MQTT (the inbox)

    @field_validator(*DURATIONS, mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator(*DURATIONS)
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"must be a positive duration, got {value:g} s")
        return value

    @field_validator("quiet_hours")
    @classmethod
    def _quiet(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parse_window(value)
        return value.strip()

    @field_validator("hold_list")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        out = []
        for address in value:
            try:
                text = normalize(address)
            except AddressError as exc:
                raise ValueError(f"hold_list: {exc}") from exc
            if not text.isdigit():
                raise ValueError(f"hold_list: a meter's address is 12 digits, got {address!r}")
            out.append(text)
        return out

    @model_validator(mode="after")
    def _validity(self) -> ControlConfig:
        if self.default_valid_for > self.max_valid_for:
            raise ValueError(f"default_valid_for ({self.default_valid_for:g} s) is longer than "
                             f"max_valid_for ({self.max_valid_for:g} s)")
        if self.verify_poll_first > self.verify_poll_max:
            raise ValueError("verify_poll_first is longer than verify_poll_max")
        return self

    @property
    def window(self) -> tuple[dt.time, dt.time] | None:
        return parse_window(self.quiet_hours) if self.quiet_hours else None
