"""`meterd status`: how collection is going, from the running daemon's `/api/v1/status`.

A plain blocking CLI (urllib, no event loop). `--watch` redraws every 2 s until Ctrl-C; `--json`
prints the raw JSON. A daemon that does not answer is a clear message and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from rich import box
from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

DEFAULT_URL = "http://127.0.0.1:8645"
BUILT_IN = {"station", "timezone", "now", "started", "uptime", "today", "yesterday", "plans", "links", "meters",
            "outcomes_total", "orphan_outcomes", "health"}


class StatusError(Exception):
    """The daemon could not be asked (not running, wrong token, not meterd)."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="show collection status of the running daemon",
                       description="Ask the running meterd for today's collection success, rounds, links and "
                       "failing meters.")
    p.add_argument("--url", default=DEFAULT_URL, help=f"the daemon's API (default {DEFAULT_URL})")
    p.add_argument("--token", default=os.environ.get("METERD_TOKEN"),
                   help="API bearer token (default: $METERD_TOKEN)")
    p.add_argument("--watch", action="store_true", help="refresh every 2 s until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(handler=run)


def fetch(url: str, token: str | None, timeout: float = 5.0) -> dict[str, Any]:
    base = urllib.parse.urlsplit(url)
    if base.scheme not in {"http", "https"} or not base.netloc:
        raise StatusError(f"--url must be http://HOST:PORT, got {url!r}")
    request = urllib.request.Request(url.rstrip("/") + "/api/v1/status")  # noqa: S310 (scheme checked above)
    request.add_header("Accept", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (scheme checked above)
            data = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise StatusError(f"{url}: the API wants a token (--token or $METERD_TOKEN), or the token is wrong") \
                from None
        raise StatusError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        raise StatusError(f"meterd is not running at {url} (or not reachable): {why}") from None
    except ValueError as exc:
        raise StatusError(f"{url} did not answer with JSON ({exc}); is it meterd?") from None
    if not isinstance(data, dict) or "today" not in data:
        raise StatusError(f"{url} answered, but not with a meterd status")
    return data


def run(args: argparse.Namespace) -> int:
    console = Console(markup=False, emoji=False)  # meter details and names are data, never markup
    try:
        data = fetch(args.url, args.token)
    except StatusError as exc:
        Console(stderr=True).print(Text.assemble(("meterd status: ", "red"), str(exc)))
        return 1
    if not args.watch:
        if args.json:
            print(json.dumps(data, indent=2, default=str))
        else:
            console.print(render(data))
        return 0
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends --watch normally
        watch(args, console, data)
    return 0


def watch(args: argparse.Namespace, console: Console, data: dict[str, Any]) -> None:
    """Redraw (or, with --json, print one JSON line) every interval; the daemon going away is shown."""
    live = None if args.json else Live(render(data), console=console, refresh_per_second=4)
    with live or contextlib.nullcontext():
        while True:
            if live is None:
                print(json.dumps(data, default=str), flush=True)
            time.sleep(args.interval)
            try:
                data = fetch(args.url, args.token)
                if live is not None:
                    live.update(render(data))
            except StatusError as exc:
                if live is not None:
                    live.update(Group(render(data), Text(f"lost the daemon: {exc}; retrying", style="red")))


# --- rendering ------------------------------------------------------------------------------------
def pct(value: float | None) -> Text:
    if value is None:
        return Text("-", style="dim")
    style = "green" if value >= 0.99 else "yellow" if value >= 0.95 else "red"
    return Text(f"{value * 100:.1f}%", style=style)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    days, s = divmod(s, 86400)
    text = f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{days}d {text}" if days else text


def failed_text(failed: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(failed.items(), key=lambda kv: -kv[1])) or "-"


def ago(now: float, t: float | None) -> str:
    return "never" if t is None else f"{duration(now - t)} ago"


def render(data: dict[str, Any]) -> RenderableType:
    today, now = data.get("today") or {}, data.get("now", time.time())
    health = (data.get("health") or {}).get("status", "?")
    head = Text.assemble(("meterd ", "bold"), (str(data.get("station", "?")), "bold cyan"),
                         f"  up {duration(data.get('uptime'))}  today {today.get('date', '?')}: ",
                         pct(today.get("success_ratio")),
                         f" ({today.get('collected', 0)}/{today.get('expected', 0)} meters)  health ",
                         (health, "green" if health == "ok" else "red"))
    parts: list[RenderableType] = [Panel(head, box=box.ROUNDED)]
    parts.append(plans_table(data))
    running = [r for p in (data.get("plans") or {}).values() for r in p.get("running", [])]
    if running:
        bars = Table(title="running rounds", box=box.SIMPLE, title_justify="left")
        for col in ("round", "plan", "", "done", "failed", "for"):
            bars.add_column(col)
        for r in running:
            bars.add_row(r["round_id"], r["plan"] + (f" (re-read {r['reread']})" if r.get("reread") else ""),
                         ProgressBar(total=max(r["expected"], 1), completed=r["done"], width=30),
                         f"{r['done']}/{r['expected']}", failed_text(r["failed"]), duration(r["duration"]))
        parts.append(bars)
    if data.get("links"):
        links = Table(title="links", box=box.SIMPLE, title_justify="left")
        for col in ("link", "state", "since", "detail"):
            links.add_column(col)
        for name, st in data["links"].items():
            state = Text("up", style="green") if st["up"] else Text("DOWN", style="bold red")
            links.add_row(name, state, ago(now, st.get("since")), st.get("detail", ""))
        parts.append(links)
    parts.append(meters_table(data, now))
    parts.extend(section_table(k, v) for k, v in data.items() if k not in BUILT_IN)
    return Group(*parts)


def plans_table(data: dict[str, Any]) -> Table:
    today = data.get("today") or {}
    t = Table(title=f"plans today ({today.get('date', '?')}, {data.get('timezone', '')})", box=box.SIMPLE,
              title_justify="left")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("plan", "left"), ("expected", "right"), ("collected", "right"), ("failed", "left"), ("success", "right"),
        ("rounds", "right"), ("last round", "right"))
    for col, justify in columns:
        t.add_column(col, justify=justify)
    plans = data.get("plans") or {}
    tallies = today.get("plans") or {}
    for name in sorted({*plans, *tallies}):
        tally, last = tallies.get(name) or {}, (plans.get(name) or {}).get("last")
        t.add_row(name, str(tally.get("expected", 0)), str(tally.get("collected", 0)),
                  failed_text(tally.get("failed") or {}), pct(tally.get("success_ratio")),
                  str(tally.get("rounds", 0)), duration(last["duration"]) if last else "-")
    return t


def meters_table(data: dict[str, Any], now: float) -> RenderableType:
    meters = data.get("meters") or {}
    title = (f"failing meters: {meters.get('failing', 0)} of {meters.get('known', 0)} "
             f"({meters.get('degraded', 0)} degraded)")
    top = meters.get("top_failing") or []
    if not top:
        return Text(title, style="green" if not meters.get("failing") else "yellow")
    t = Table(title=title, box=box.SIMPLE, title_justify="left")
    for col in ("meter", "link", "area", "reason", "in a row", "last success", "detail"):
        t.add_column(col)
    for m in top:
        reason = m.get("reason") or "-"
        t.add_row(m["meter"], m.get("link", ""), m.get("area", ""), Text(reason, style="red"),
                  str(m["consecutive_failures"]) + (" (degraded)" if m.get("degraded") else ""),
                  ago(now, m.get("last_success")), m.get("detail", ""))
    return t


def section_table(name: str, value: Any) -> RenderableType:
    """Sections others add (sinks, journal): a table of whatever keys they carry."""
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        cols = list(dict.fromkeys(k for row in value.values() for k in row))
        t = Table(title=name, box=box.SIMPLE, title_justify="left")
        t.add_column("name")
        for col in cols:
            t.add_column(col)
        for key, row in value.items():
            t.add_row(str(key), *(_cell(row.get(c)) for c in cols))
        return t
    if isinstance(value, dict):
        t = Table(title=name, box=box.SIMPLE, title_justify="left", show_header=False)
        for key, v in value.items():
            t.add_row(str(key), _cell(v))
        return t
    return Text(f"{name}: {_cell(value)}")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e6 else f"{v:.0f}"
    return json.dumps(v, default=str) if isinstance(v, dict | list) else str(v)
