"""`meterd readings`: what the journal holds for one meter, as a table, JSON lines or CSV.

Opens the journal read-only, so it works while the daemon runs. Times on the
command line are ISO 8601 (local time unless an offset is given) or relative
to now (`-1h`, `-2d`, `-30m`); times printed are local, with the offset in
JSON and CSV. Any error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import re
import sqlite3
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from gateway import journal_store as store
from gateway.model import Reading

FILENAME = "journal.sqlite"  # <state_dir>/journal.sqlite, as the daemon writes it
ADDRESS = re.compile(r"^\d{12}$")
RELATIVE = re.compile(r"^-?(\d+(?:\.\d+)?)\s*([smhdw])$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
FIELDS = ("meter", "quantity", "value", "unit", "time", "collected", "quality", "frozen", "station", "link", "plan")


class UsageError(Exception):
    """A bad argument or an unusable journal: printed as one line, exit status 2."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("readings", help="show readings stored in the journal",
                       description="Query the journal (<state_dir>/journal.sqlite) for one meter. "
                       "TIME is ISO 8601 (local unless it has an offset, e.g. 2024-05-01 or 2024-05-01T00:10+08:00) "
                       "or relative to now: -30m, -1h, -2d, -1w.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--state-dir", type=Path, metavar="DIR", help="the daemon's state directory")
    where.add_argument("--config", type=Path, metavar="FILE", help="the daemon's TOML config ([station] state_dir)")
    p.add_argument("--meter", required=True, metavar="ADDR", help="meter address, 12 digits")
    p.add_argument("--since", metavar="TIME", help="readings at or after TIME (the time they describe)")
    p.add_argument("--until", metavar="TIME", help="readings at or before TIME")
    p.add_argument("--quantity", metavar="NAME", help="one quantity, e.g. forward_active_energy")
    p.add_argument("--limit", type=int, default=1000, metavar="N", help="the newest N readings (default 1000)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format")
    # let `--since -1h` through as a value rather than an unknown option
    p._negative_number_matcher = re.compile(r"^-\d+(\.\d+)?\s*[smhdw]?$")
    p.set_defaults(handler=run)


def journal_path(args: argparse.Namespace) -> Path:
    if args.state_dir is not None:
        return Path(args.state_dir) / FILENAME
    try:
        with Path(args.config).open("rb") as f:
            config = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read config {args.config}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config {args.config} is not valid TOML: {exc}") from exc
    state_dir = config.get("station", {}).get("state_dir")
    if not isinstance(state_dir, str) or not state_dir:
        raise UsageError(f"config {args.config} has no [station] state_dir")
    path = Path(state_dir)
    if not path.is_absolute():  # as the daemon does: relative to the config file
        path = Path(args.config).parent / path
    return path / FILENAME


def parse_time(text: str | None, option: str, now: float) -> float | None:
    """ISO 8601 (naive = local time) or -1h/-2d/-30m/-10s/-1w -> UTC seconds."""
    if text is None:
        return None
    text = text.strip()
    if text == "now":
        return now
    m = RELATIVE.match(text)
    if m:
        return now - float(m.group(1)) * UNIT_SECONDS[m.group(2)]
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{option} {text!r}: use ISO 8601 (2024-05-01, 2024-05-01T00:10, "
                         "2024-05-01T00:10+08:00) or a time relative to now (-30m, -1h, -2d, -1w)") from None
    return when.astimezone().timestamp()  # a naive time is taken as local time


def open_journal(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise UsageError(f"no journal at {path} (has meterd run with this state directory?)")
    try:
        conn = store.connect(path, readonly=True)
        conn.execute("SELECT 1 FROM readings LIMIT 1").fetchall()
    except sqlite3.Error as exc:
        raise UsageError(str(store.explain(exc, path))) from exc
    return conn


def local(t: float, timespec: str = "auto") -> str:
    return dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec=timespec)


def record(r: Reading) -> dict[str, Any]:
    return {"meter": r.meter, "quantity": r.quantity, "value": r.value, "unit": r.unit, "time": local(r.time),
            "collected": local(r.collected), "quality": r.quality.value, "frozen": r.frozen,
            "station": r.station, "link": r.link, "plan": r.plan}


def print_table(meter: str, readings: list[Reading]) -> None:
    from rich import box  # noqa: PLC0415 - rich only when a table is asked for
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=f"meter {meter}: {len(readings)} readings", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("time (local)", no_wrap=True)
    table.add_column("quantity", no_wrap=True)
    table.add_column("value", justify="right")
    table.add_column("unit")
    table.add_column("quality")
    table.add_column("frozen")
    for r in readings:
        value = "—" if r.value is None else str(r.value)
        quality = r.quality.value if r.quality.value == "good" else f"[yellow]{r.quality.value}[/]"
        table.add_row(local(r.time, "seconds").replace("T", " ")[:19], r.quantity, value, r.unit, quality,
                      "yes" if r.frozen else "")
    console = Console()
    if not console.is_terminal:  # piped: full width, never truncated to an assumed 80 columns
        console = Console(width=240)
    console.print(table)


def run(args: argparse.Namespace) -> int:
    try:
        if not ADDRESS.match(args.meter):
            raise UsageError(f"--meter {args.meter!r}: a meter address is 12 digits, e.g. 000102030405")
        if args.limit < 1:
            raise UsageError(f"--limit {args.limit}: must be at least 1")
        now = time.time()
        since, until = parse_time(args.since, "--since", now), parse_time(args.until, "--until", now)
        path = journal_path(args)
        conn = open_journal(path)
        try:
            readings = store.query(conn, meter=args.meter, since=since, until=until,
                                   quantity=args.quantity, limit=args.limit)
            known = None if readings else len(store.meters(conn))
        except sqlite3.Error as exc:
            raise UsageError(str(store.explain(exc, path))) from exc
        finally:
            conn.close()
    except UsageError as exc:
        print(f"meterd readings: {exc}", file=sys.stderr)
        return 2
    if known is not None:
        print(f"meterd readings: no readings for meter {args.meter} in that range "
              f"({known} meter(s) have readings in the journal)", file=sys.stderr)
    if args.format == "json":
        for r in readings:
            print(json.dumps(record(r), ensure_ascii=False))
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(record(r) for r in readings)
    elif readings:
        print_table(args.meter, readings)
    return 0

