"""The billing system's CSV export: account settings and balances, one meter a line.

Columns (a header line is required, order free, empty cell = not given):
address, balance, update_id, as_of, price | price_t1..price_t4, alarm_threshold, trip_threshold,
restore_threshold. A line with a balance needs an update_id (the billing record's key): importing
the same file twice applies it once. Every line is checked before anything is applied; errors
name the line (1 = the header) and the column.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

from gateway.prepaid.forms import SETTING_FIELDS, TARIFF_FIELDS, parse_settings, parse_time, text
from gateway.prepaid.ledger import Settings
from gateway.prepaid.money import PrepaidError, format_money, parse_money
from gateway.prepaid.policy import Prepaid

COLUMNS = ("address", "balance", "update_id", "as_of", *(f for f in SETTING_FIELDS if f != "tariff_prices"))
MAX_LINES = 200_000


class BadImport(PrepaidError):
    """A CSV that cannot be imported; `errors` lists every bad line."""

    def __init__(self, errors: list[str]) -> None:
        more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
        super().__init__(f"{len(errors)} error(s), nothing imported: " + "; ".join(errors[:10]) + more)
        self.errors = errors


@dataclass(frozen=True, slots=True)
class Row:
    line: int
    meter: str
    settings: Settings | None
    balance: int | None
    update_id: str
    as_of: float | None


def parse(body: str, prepaid: Prepaid) -> list[Row]:
    """Check every line (addresses, known meters, numbers); BadImport lists all that are wrong."""
    # newline="": the csv module sees CR, LF and CRLF line ends itself (Excel exports CRLF, old Macs CR)
    reader = csv.DictReader(io.StringIO(body.lstrip("\ufeff"), newline=""), skipinitialspace=True)
    try:
        return _parse(reader, prepaid)
    except csv.Error as exc:  # malformed quoting and the like: still a refusal that names the line
        raise BadImport([f"line {reader.line_num}: not CSV: {exc}"]) from None


def _parse(reader: csv.DictReader[str], prepaid: Prepaid) -> list[Row]:
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        raise BadImport(["line 1: the file is empty (a header line is needed: " + ", ".join(COLUMNS) + ")"])
    bad = [h for h in header if h not in COLUMNS]
    if bad or "address" not in header:
        why = f"unknown column(s) {', '.join(map(repr, bad))}" if bad else "no address column"
        raise BadImport([f"line 1: {why}; the columns are {', '.join(COLUMNS)}"])
    if "price" in header and any(t in header for t in TARIFF_FIELDS):
        raise BadImport(["line 1: give either a price column or price_t1..price_t4 columns, not both"])
    reader.fieldnames = header
    rows: list[Row] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for record in reader:
        line = reader.line_num
        if line > MAX_LINES:
            raise BadImport([f"line {line}: more than {MAX_LINES} lines; split the file"])
        if None in record:
            errors.append(f"line {line}: more cells than columns")
            continue
        cells = {k: v.strip() for k, v in record.items() if v is not None}
        if not any(cells.values()):
            continue  # a blank line
        try:
            row = _row(line, cells, prepaid)
        except PrepaidError as exc:
            errors.append(f"line {line}: {exc}")
            continue
        if row.meter in seen:
            errors.append(f"line {line}: meter {row.meter} is already on line {seen[row.meter]}")
            continue
        seen[row.meter] = line
        rows.append(row)
    if errors:
        raise BadImport(errors)
    return rows


def _row(line: int, cells: dict[str, str], prepaid: Prepaid) -> Row:
    meter = prepaid.check_meter(cells.get("address", ""))
    settings = parse_settings({k: v for k, v in cells.items() if k in SETTING_FIELDS and v})
    balance = None
    update_id = ""
    if cells.get("balance"):
        balance = parse_money(cells["balance"], "balance")
        update_id = text(cells, "update_id")
        if len(update_id) > 200:
            raise PrepaidError("update_id is longer than 200 characters")
    elif cells.get("update_id") or cells.get("as_of"):
        raise PrepaidError("update_id/as_of without a balance")
    if settings is None and balance is None:
        raise PrepaidError("nothing to import: no balance and no settings")
    return Row(line, meter, settings, balance, update_id, parse_time(cells.get("as_of")))


async def apply(rows: list[Row], prepaid: Prepaid) -> tuple[list[dict[str, Any]], list[str]]:
    """Apply the lines in order: settings first, then the balance. A line that fails now (a key
    reused for something else, thresholds out of order with the account's own) is reported and
    the others go on; importing again is safe."""
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    for row in rows:
        done: dict[str, Any] = {"line": row.line, "meter": row.meter}
        try:
            if row.settings is not None:
                await prepaid.upsert_account(row.meter, row.settings)
                done["settings"] = "applied"
            if row.balance is not None:
                result = await prepaid.set_balance(row.meter, format_money(row.balance), row.update_id, row.as_of,
                                                   source="csv")
                done["balance"] = result["outcome"]
                done["actions"] = [a["action"] for a in result["actions"]]
        except PrepaidError as exc:
            errors.append(f"line {row.line}: {exc}")
            done["error"] = str(exc)
        results.append(done)
    return results, errors
