"""Password groups -> `Auth` per meter, from the config and an optional secrets file.

The secrets file keeps passwords out of the main config (which is shown, copied and
committed more freely): a TOML file with the same `[groups.<name>]` tables, read once
at startup; its values override the inline ones key by key. Errors name the file and
the key, never a password.
"""

from __future__ import annotations

import logging
import stat
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway.control.config import ControlConfig, GroupAuth
from protocols.dlt645 import Auth
from protocols.dlt645.requests import DEFAULT_AUTH

log = logging.getLogger(__name__)
DEFAULT_GROUP = "default"


class SecretsError(ValueError):
    """A secrets file or password group that cannot be used; the message says where and why."""


def _read_file(path: Path) -> dict[str, dict[str, Any]]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise SecretsError(f"{path}: cannot read the control secrets file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SecretsError(f"{path}: not valid TOML: {exc}") from exc
    unknown = set(data) - {"groups"}
    if unknown:
        raise SecretsError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}; expected [groups.<name>]")
    groups = data.get("groups", {})
    if not isinstance(groups, dict) or not all(isinstance(v, dict) for v in groups.values()):
        raise SecretsError(f"{path}: [groups] must hold [groups.<name>] tables")
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("the control secrets file %s is readable by other users; chmod 600 it", path)
    return groups


def load_groups(config: ControlConfig) -> dict[str, Auth]:
    """Every configured group as an `Auth`; SecretsError when a group ends up without a valid password."""
    merged: dict[str, dict[str, Any]] = {}
    for name, group in config.groups.items():
        merged[name] = group.model_dump(exclude_unset=True)
    if config.secrets_file is not None:
        for name, table in _read_file(config.secrets_file).items():
            merged[name] = {**merged.get(name, {}), **table}
    where = f" (secrets file {config.secrets_file})" if config.secrets_file else ""
    out: dict[str, Auth] = {}
    for name, values in merged.items():
        try:
            group = GroupAuth.model_validate(values)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first["loc"]) or "group"
            raise SecretsError(f"control group {name!r}{where}: {key}: {first['msg']}") from None
        if group.password is None:
            raise SecretsError(f"control group {name!r}{where}: no password (set it inline or in the secrets file)")
        out[name] = Auth(group.level, group.password.get_secret_value(), group.operator)
    return out


class Passwords:
    """Which `Auth` a meter's 1C frame carries (by MeterConfig.password_group)."""

    def __init__(self, groups: dict[str, Auth]) -> None:
        self.groups = groups
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return f"Passwords(groups={sorted(self.groups)})"

    def auth_for(self, group: str) -> Auth:
        name = group or DEFAULT_GROUP
        auth = self.groups.get(name)
        if auth is not None:
            return auth
        if name != DEFAULT_GROUP and name not in self._warned:
            self._warned.add(name)
            log.warning("control: password group %r is not configured; its meters get the factory "
                        "default password", name)
        return DEFAULT_AUTH
