"""`meterd accounts`: prepaid accounts of the running daemon, through its API.

    meterd accounts [--json]                         balances, estimates, thresholds, state, actions
    meterd accounts import FILE                      the billing system's CSV (errors name the line)
    meterd accounts pay ADDRESS AMOUNT [--payment-id ID]

A plain blocking CLI (urllib) like `meterd status`: --url / --token / $METERD_TOKEN. A payment
without --payment-id gets a fresh one, printed so that a retry can reuse it (applied once).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gateway.status_cli import DEFAULT_URL


class AccountsError(Exception):
    """The daemon could not be asked, or refused; the message says why."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("accounts", help="prepaid accounts: balances, estimates, payments, CSV import",
                       description="List the running meterd's prepaid accounts (balance, estimated balance, "
                       "thresholds, state, pending actions), import the billing CSV, or record a payment.")
    _options(p, None)
    actions = p.add_subparsers(dest="accounts_action", metavar="ACTION")
    imp = actions.add_parser("import", help="import the billing system's CSV (address, balance, update_id, ...)")
    imp.add_argument("file", type=Path, help="CSV file with a header line")
    _options(imp, argparse.SUPPRESS)
    pay = actions.add_parser("pay", help="record a payment; a payment over the restore threshold restores power")
    pay.add_argument("address", help="meter address (12 digits; shorter is zero-padded)")
    pay.add_argument("amount", help="amount in the currency unit, e.g. 50 or 19.99")
    pay.add_argument("--payment-id", help="idempotency key (default: a new one, printed)")
    _options(pay, argparse.SUPPRESS)
    p.set_defaults(handler=run)


def _options(p: argparse.ArgumentParser, default: object) -> None:
    """--url/--token/--json before or after ACTION (sub-parsers must not reset what the parent parsed)."""
    p.add_argument("--url", default=DEFAULT_URL if default is None else default,
                   help=f"the daemon's API (default {DEFAULT_URL})")
    p.add_argument("--token", default=os.environ.get("METERD_TOKEN") if default is None else default,
                   help="API bearer token (default: $METERD_TOKEN)")
    p.add_argument("--json", action="store_true", default=False if default is None else default,
                   help="print the daemon's JSON answer")


def call(url: str, token: str | None, method: str, path: str, body: bytes | None = None, *,
         content_type: str = "application/json", timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    """One API request; (status, JSON). A 4xx with a JSON error is returned, not raised."""
    base = urllib.parse.urlsplit(url)
    if base.scheme not in {"http", "https"} or not base.netloc:
        raise AccountsError(f"--url must be http://HOST:PORT, got {url!r}")
    request = urllib.request.Request(url.rstrip("/") + path, data=body, method=method)  # noqa: S310 (checked)
    request.add_header("Accept", "application/json")
    if body is not None:
        request.add_header("Content-Type", content_type)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (scheme checked above)
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise AccountsError(f"{url}: the API wants a token (--token or $METERD_TOKEN), or the token is wrong") \
                from None
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise AccountsError(f"meterd is not running at {url} (or not reachable): {getattr(exc, 'reason', exc)}") \
            from None
    try:
        data = json.loads(raw)
    except ValueError:
        raise AccountsError(f"{url} answered HTTP {status} without JSON; is it meterd?") from None
    if status == 404 and path == "/api/v1/accounts":
        raise AccountsError(f"{url}: this meterd has no prepaid accounts API (is [prepaid] enabled?)")
    return status, data


def run(args: argparse.Namespace) -> int:
    console = Console(markup=False, emoji=False, highlight=False)
    errors = Console(stderr=True, markup=False, emoji=False, highlight=False)
    try:
        if args.accounts_action == "import":
            return _import(args, console, errors)
        if args.accounts_action == "pay":
            return _pay(args, console, errors)
        status, data = call(args.url, args.token, "GET", "/api/v1/accounts")
        if status >= 400:
            raise AccountsError(str(data.get("error", data)))
    except AccountsError as exc:
        errors.print(Text.assemble(("meterd accounts: ", "red"), str(exc)))
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        console.print(render(data))
    return 0


def _import(args: argparse.Namespace, console: Console, errors: Console) -> int:
    try:
        body = args.file.read_bytes()
    except OSError as exc:
        raise AccountsError(f"{args.file}: {exc.strerror or exc}") from None
    status, data = call(args.url, args.token, "POST", "/api/v1/accounts/import", body,
                        content_type="text/csv; charset=utf-8")
    if args.json:
        print(json.dumps(data, indent=2))
    if status >= 400:
        problems = data.get("errors") or [data.get("error", f"HTTP {status}")]
        errors.print(Text(f"meterd accounts import {args.file}: {len(problems)} problem(s)", style="red"))
        for problem in problems:
            errors.print(f"  {args.file}: {problem}")
        if data.get("imported"):
            errors.print(f"  the other {data['imported']} line(s) were applied; importing again is safe")
        return 1
    if not args.json:
        lines = data.get("lines", [])
        changed = sum(1 for line in lines if line.get("balance") == "applied" or line.get("settings"))
        console.print(f"imported {args.file}: {len(lines)} line(s), {changed} applied")
        for line in lines:
            if line.get("balance") in {"duplicate", "stale"} or line.get("actions"):
                extra = f", submitted {', '.join(line['actions'])}" if line.get("actions") else ""
                console.print(f"  line {line['line']} meter {line['meter']}: balance {line.get('balance')}{extra}")
    return 0


def _pay(args: argparse.Namespace, console: Console, errors: Console) -> int:
    payment_id = args.payment_id or f"cli-{uuid.uuid4().hex}"
    body = json.dumps({"amount": args.amount, "payment_id": payment_id}).encode()
    address = urllib.parse.quote(args.address, safe="")
    status, data = call(args.url, args.token, "POST", f"/api/v1/accounts/{address}/payments", body)
    if status >= 400:
        raise AccountsError(str(data.get("error", f"HTTP {status}")))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    account = data["account"]
    verb = "paid" if data["outcome"] == "applied" else "already paid (not counted again)"
    console.print(f"{verb}: {args.amount} {account['currency']} to meter {account['meter']} "
                  f"(payment id {payment_id})")
    est = " (estimated)" if account["estimated"] else ""
    console.print(f"balance now {account['estimated_balance']}{est}, state {account['state']}")
    if data["actions"]:
        done = ", ".join(f"{a['action']} ({a['result'] or a['status']})" for a in data["actions"])
        console.print(f"submitted: {done}")
    return 0


# --- rendering ------------------------------------------------------------------------------------
def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%m-%d %H:%M", time.localtime(t))


def _action(a: dict[str, Any] | None) -> str:
    if not a:
        return "-"
    state = a.get("result") or a.get("status", "")
    return f"{a['action']}: {state}" + (f" ({a['detail']})" if a.get("detail") and a["status"] != "submitted" else "")


def render(data: dict[str, Any]) -> Table | Text:
    accounts = data.get("accounts") or []
    if not accounts:
        return Text("no prepaid accounts", style="yellow")
    t = Table(title=f"prepaid accounts ({data.get('currency', '')})", box=box.SIMPLE, title_justify="left")
    for col, justify in (("meter", "left"), ("state", "left"), ("balance", "right"), ("as of", "left"),
                         ("estimated", "right"), ("reading", "left"), ("price", "left"),
                         ("alarm/trip/restore", "left"), ("pending / last action", "left")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    for a in accounts:
        state = Text(a["state"], style={"normal": "green", "alarmed": "yellow", "tripped": "bold red"}[a["state"]])
        est = Text(a["estimated_balance"] or "-")
        if a["estimated"]:
            est.append(" est.", style="dim")
        tariffs = a.get("tariff_prices") or {}
        price = " ".join(f"t{n}:{p}" for n, p in tariffs.items()) if tariffs else (a["price"] or "-")
        pending = a.get("pending_actions") or []
        action = "; ".join(_action(p) for p in pending) if pending else _action(a.get("last_action"))
        t.add_row(a["meter"], state, a["balance"] or "-", _when(a["balance_as_of"]), est,
                  _when(a["estimate_reading_time"]) if a["estimated"] else a.get("estimate_note", ""), price,
                  f"{a['alarm_threshold']}/{a['trip_threshold']}/{a['restore_threshold']}", action)
    return t
