"""`meterd` command line: one sub-command per job; each lives in its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gateway import daemon_cli, decoding, read_cli, readings_cli, status_cli
from gateway.control import cli as control_cli
from gateway.prepaid import cli as accounts_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meterd", description="DL/T 645 meter collection gateway")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    decoding.add_parser(sub)
    daemon_cli.add_parsers(sub)
    readings_cli.add_parser(sub)
    read_cli.add_parser(sub)
    status_cli.add_parser(sub)
    control_cli.add_parser(sub)
    accounts_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
