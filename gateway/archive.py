"""The meter archive: which meters exist, on which link, speaking what.

Real stations have thousands of meters, so besides inline `[[meters]]` the
archive comes from a CSV export (address, link, protocol, edition, area,
customer, password_group, peer). Bad rows are reported with file and line.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from protocols.dlt645 import AddressError, normalize

CSV_COLUMNS = ("address", "link", "protocol", "edition", "area", "customer", "password_group", "peer")


class MeterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str
    link: str
    protocol: Literal["dlt645"] = "dlt645"
    edition: Literal[2007, 1997] = 2007
    area: str = ""
    customer: str = ""
    password_group: str = ""
    peer: str | None = None  # identity of the DTU/peer on a tcp-listen link (default: the meter's address)
    first_byte_timeout: float | None = Field(default=None, gt=0)
    inter_byte_timeout: float | None = Field(default=None, gt=0)
    tariffs: int = Field(default=4, ge=1, le=14)

    @field_validator("edition", mode="before")
    @classmethod
    def _edition(cls, value: object) -> object:
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value  # CSV cells are text

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            text = normalize(value)
        except AddressError as exc:
            raise ValueError(str(exc)) from exc
        if not text.isdigit():
            raise ValueError(f"a meter's address is 12 digits (no wildcards), got {value!r}")
        return text


class ArchiveError(ValueError):
    """A meter archive CSV that cannot be loaded; the message names file and line."""


def load_csv(path: Path) -> list[MeterConfig]:
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise ArchiveError(f"{path}: cannot read the meter archive: {exc.strerror}") from exc
    meters: list[MeterConfig] = []
    with handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = {"address", "link"} - set(header)
        if missing:
            raise ArchiveError(f"{path}:1: missing column(s) {', '.join(sorted(missing))}; expected {CSV_COLUMNS}")
        unknown = set(header) - set(CSV_COLUMNS)
        if unknown:
            raise ArchiveError(f"{path}:1: unknown column(s) {', '.join(sorted(unknown))}; expected {CSV_COLUMNS}")
        for line, row in enumerate(reader, start=2):
            values = {k: v.strip() for k, v in row.items() if k and v is not None and v.strip()}
            try:
                meters.append(MeterConfig.model_validate(values))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "row"
                raise ArchiveError(f"{path}:{line}: {where}: {first['msg']}") from exc
    return meters
