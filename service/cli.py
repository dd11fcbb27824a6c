"""The ``svertka`` command: parses arguments and hands off to one subcommand.

Each half registers its own subcommands; nothing heavy is imported until a
subcommand runs, so ``svertka serve`` works without torch installed.
"""

from __future__ import annotations

import argparse
import sys

from service import __version__
from service.clierrors import CommandError


def build_parser() -> argparse.ArgumentParser:
    from export.cli import register as register_export
    from service.health_cli import register as register_health
    from service.perf_cli import register as register_perf
    from service.server_cli import register as register_server

    parser = argparse.ArgumentParser(prog="svertka", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"svertka {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_export(sub)
    register_server(sub)
    register_health(sub)
    register_perf(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except CommandError as exc:
        print(f"svertka {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
