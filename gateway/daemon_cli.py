"""`meterd run` and `meterd check-config`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any


def add_parsers(sub: Any) -> None:
    run = sub.add_parser("run", help="run the collection daemon in the foreground")
    run.add_argument("--config", "-c", type=Path, required=True, help="the TOML configuration")
    run.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    run.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    run.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"),
                     help="event loop (auto: uvloop when the extra 'fast' is installed)")
    run.add_argument("--no-tune-gc", dest="tune_gc", action="store_false",
                     help="keep CPython's default garbage-collector settings (see gateway/runtime.py)")
    run.set_defaults(handler=run_daemon)
    check = sub.add_parser("check-config", help="validate a configuration without touching hardware")
    check.add_argument("config", type=Path)
    check.set_defaults(handler=check_config)


def check_config(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError, load_config  # noqa: PLC0415  (keeps other sub-commands fast)

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"{args.config}: ok: station {config.station.name}, {len(config.links)} links, {len(config.meters)} meters, "
          f"{len(config.plans)} plans, {len(config.sinks)} sinks")
    return 0


def run_daemon(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError, load_config  # noqa: PLC0415  (keeps other sub-commands fast)
    from gateway.logs import setup_logging  # noqa: PLC0415

    setup_logging(getattr(logging, args.log_level), json=args.log_json)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    from gateway import runtime  # noqa: PLC0415
    from gateway.daemon import Daemon  # noqa: PLC0415  (the daemon's imports are only needed to run it)

    daemon = Daemon(config, args.config)
    if args.tune_gc:  # modules, configuration and the meter archive exist now: freeze them
        runtime.tune_gc()
    logging.getLogger(__name__).info("event loop %s, garbage collector %s", runtime.loop_name(args.loop),
                                     "tuned" if args.tune_gc else "default")
    return runtime.run(daemon.run(), loop=args.loop)
