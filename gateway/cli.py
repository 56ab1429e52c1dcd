"""`meterd` command line: one sub-command per job; each lives in its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gateway import daemon_cli, decoding, read_cli, readings_cli, status_cli

NOT_YET = ("control", "accounts")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meterd", description="DL/T 645 meter collection gateway")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    decoding.add_parser(sub)
    daemon_cli.add_parsers(sub)
    readings_cli.add_parser(sub)
    read_cli.add_parser(sub)
    status_cli.add_parser(sub)
    for name in NOT_YET:
        sub.add_parser(name, help="(not available yet)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in NOT_YET:
        print(f"meterd {args.command}: not available yet in this version", file=sys.stderr)
        return 2
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
