"""`meterd control ADDRESS ACTION`: send a control command to the running daemon, and follow it.

    meterd control 000000000001 close --reason "paid 50 CNY" --request-id pay-8812 --wait
    meterd control 000000000001 trip --valid-for 30m --json

The command goes through the daemon's API (`POST /api/v1/meters/{address}/commands`), so it is
persisted, guarded and serialized like any other. The daemon is found like `meterd read` finds
it: `--url`, else `[api] listen` and its token from `--config` (default $METERD_CONFIG or
/etc/meterd/meterd.toml, if that file exists), else http://127.0.0.1:8645; `--token` (default
$METERD_TOKEN) wins over the config's token. `--wait` follows `GET /api/v1/commands/{id}` and
prints each state change until the command ends (default: its deadline plus 10 minutes of
verification; `--timeout` to stop earlier). A plain blocking CLI (urllib), like `meterd status`.

Exit status: 0 accepted (without --wait), verified or dry_run; 1 failed, expired, superseded,
or still open when the wait ended; 2 usage, config, a refused request or no daemon to ask.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from gateway.config import ConfigError, load_config
from gateway.control.api import ACTIONS, BadRequest, check_address, parse_action, parse_valid_for
from gateway.read_cli import DEFAULT_CONFIG, api_url
from gateway.status_cli import DEFAULT_URL

GOOD = frozenset({"verified", "dry_run"})
BAD = frozenset({"failed", "expired", "superseded"})
VERIFY_MARGIN = 600.0  # s after the deadline a sent command may still be verifying
REQUEST_TIMEOUT = 10.0


class UsageError(Exception):
    """Exit status 2: bad arguments or config, a refused request, or no daemon to ask."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("control", help="send a control command (trip, close, ...) and follow it",
                       description="Send a control command to the meter at ADDRESS through the running daemon; "
                       f"ACTION is one of {', '.join(ACTIONS)}. With --wait, print each state change until the "
                       "command ends. Exit 0 verified/dry_run, 1 failed/expired/superseded, 2 usage or no daemon.")
    p.add_argument("address", metavar="ADDRESS", help="the meter's 12-digit address")
    p.add_argument("action", metavar="ACTION", help=", ".join(ACTIONS))
    p.add_argument("--reason", default="", help="why (kept with the command, shown in its audit trail)")
    p.add_argument("--valid-for", metavar="D", help="how long it may still be sent: 90s, 30m, 1h (default: the "
                   "daemon's default_valid_for)")
    p.add_argument("--request-id", metavar="K", help="idempotency key: the same key returns the same command, "
                   "never a second execution")
    p.add_argument("--wait", action="store_true", help="follow the command until it ends")
    p.add_argument("--timeout", type=float, metavar="S", help="with --wait: stop waiting after S seconds "
                   "(default: the command's deadline plus 10 minutes)")
    p.add_argument("--json", action="store_true", help="print the command as JSON (with --wait: one line per change)")
    p.add_argument("--url", help=f"the daemon's API (default: from the config, else {DEFAULT_URL})")
    p.add_argument("--token", default=os.environ.get("METERD_TOKEN"), help="API bearer token (default: "
                   "$METERD_TOKEN, else the config's)")
    p.add_argument("--config", "-c", type=Path, help=f"the daemon's config, for its API address and token "
                   f"(default $METERD_CONFIG or {DEFAULT_CONFIG})")
    p.add_argument("--interval", type=float, default=0.5, help=argparse.SUPPRESS)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    console = Console(markup=False, emoji=False, highlight=False)
    try:
        body = request_body(args)
        url, token = daemon(args)
        command = post(url, token, args.address, body)
    except UsageError as exc:
        print(f"meterd control: {exc}", file=sys.stderr)
        return 2
    show(console, command, args.json, first=True)
    if not args.wait:
        return exit_status(command)
    return follow(console, args, url, token, command)


# --- what to send, and where ----------------------------------------------------------------------
def request_body(args: argparse.Namespace) -> dict[str, Any]:
    try:
        check_address(args.address)
        body: dict[str, Any] = {"action": str(parse_action(args.action))}
        if args.valid_for is not None:
            parse_valid_for(args.valid_for)
            body["valid_for"] = args.valid_for
    except BadRequest as exc:
        raise UsageError(str(exc)) from None
    if args.request_id is not None:
        if not args.request_id.strip():
            raise UsageError("--request-id is empty")
        body["request_id"] = args.request_id
    if args.reason:
        body["reason"] = args.reason
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be > 0")
    return body


def daemon(args: argparse.Namespace) -> tuple[str, str | None]:
    """The API's URL and token, from the flags and (if there is one) the daemon's config."""
    url, token = args.url, args.token
    path = args.config or Path(os.environ.get("METERD_CONFIG", DEFAULT_CONFIG))
    if (url is None or token is None) and (args.config is not None or path.exists()):
        try:
            config = load_config(path)
            url = url or api_url(config.api.listen)
            token = token or config.api.resolved_token()
        except (ConfigError, ValueError) as exc:
            if args.config is not None or url is None:  # a default config that is broken does not stop --url
                raise UsageError(f"{exc} (the config says where the daemon's API is; or give --url)") from None
    url = url or DEFAULT_URL
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise UsageError(f"--url must be http://HOST:PORT, got {url!r}")
    return url.rstrip("/"), token


def call(url: str, token: str | None, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One API call -> its JSON; UsageError for anything but a 2xx with JSON."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method)  # noqa: S310 (scheme checked)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:  # noqa: S310 (scheme checked)
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise UsageError(f"{url}: the API wants a token (--token, $METERD_TOKEN or the config's [api] token), "
                             "or the token is wrong") from None
        try:
            answer = json.loads(exc.read())
        except ValueError:
            answer = {}
        error = answer.get("error") if isinstance(answer, dict) else None
        if exc.code == 404 and error is None:
            raise UsageError(f"{url} answers, but has no control commands (an older meterd?)") from None
        raise UsageError(f"the daemon refused: {error or f'HTTP {exc.code} {exc.reason}'}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise UsageError(f"meterd is not running at {url} (or not reachable): {getattr(exc, 'reason', exc)}") \
            from None
    except ValueError as exc:
        raise UsageError(f"{url} did not answer with JSON ({exc}); is it meterd?") from None


def post(url: str, token: str | None, address: str, body: dict[str, Any]) -> dict[str, Any]:
    command = call(url, token, "POST", f"/api/v1/meters/{address}/commands", body)
    if not isinstance(command, dict) or "id" not in command or "state" not in command:
        raise UsageError(f"{url} answered, but not with a command")
    return command


# --- following it ---------------------------------------------------------------------------------
def follow(console: Console, args: argparse.Namespace, url: str, token: str | None, command: dict[str, Any]) -> int:
    """Poll until the command ends; print every change. The daemon going away is said once and waited out."""
    limit = args.timeout if args.timeout is not None else \
        max(0.0, float(command.get("deadline") or 0) - time.time()) + VERIFY_MARGIN
    give_up = time.monotonic() + limit
    lost: str | None = None
    while not command.get("terminal"):
        if time.monotonic() >= give_up:
            if lost is not None:
                print(f"meterd control: {lost}", file=sys.stderr)
                return 2
            print(f"meterd control: stopped waiting after {limit:g} s; command {command['id']} is still "
                  f"{command['state']} (the daemon goes on with it)", file=sys.stderr)
            return 1
        time.sleep(min(args.interval, max(0.0, give_up - time.monotonic())))
        try:
            latest = call(url, token, "GET", f"/api/v1/commands/{urllib.parse.quote(command['id'], safe='')}")
        except UsageError as exc:
            if lost is None:
                print(f"meterd control: lost the daemon ({exc}); still waiting", file=sys.stderr)
            lost = str(exc)
            continue
        lost = None
        if isinstance(latest, dict) and (latest.get("state"), latest.get("attempts")) != \
                (command.get("state"), command.get("attempts")):
            show(console, latest, args.json)
        command = latest if isinstance(latest, dict) else command
    return exit_status(command)


def exit_status(command: dict[str, Any]) -> int:
    return 1 if command.get("state") in BAD else 0


def clock(stamp: object) -> str:
    return time.strftime("%H:%M:%S", time.localtime(float(stamp))) if isinstance(stamp, int | float) else "--:--:--"


def show(console: Console, command: dict[str, Any], as_json: bool, *, first: bool = False) -> None:
    if as_json:
        print(json.dumps(command, default=str), flush=True)
        return
    state = str(command.get("state"))
    if first:
        console.print(Text.assemble(
            ("command ", "bold"), (str(command.get("id")), "bold cyan"),
            f": {command.get('action')} meter {command.get('meter')} (request {command.get('request_id')}, "
            f"valid until {clock(command.get('deadline'))})"))
    style = "green" if state in GOOD else "red" if state in BAD else "yellow"
    why = " ".join(str(command[k]) for k in ("fail_reason", "detail") if command.get(k))
    attempts = f"attempt {command['attempts']}" if command.get("attempts") else ""
    console.print(Text.assemble(f"{clock(command.get('updated'))}  ", (f"{state:<12}", style), "  ",
                                "  ".join(part for part in (attempts, why) if part)))
