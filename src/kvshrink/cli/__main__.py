"""``kvshrink`` command line. Subcommands register in ``COMMANDS``; errors are one line, exit 2."""

from __future__ import annotations

import sys

from . import frontier, longbench
from .common import Parser, fail, run_cli

__all__ = ["main"]

COMMANDS = (frontier, longbench)


def main(argv: list[str] | None = None) -> int:
    from .._version import __version__

    parser = Parser(prog="kvshrink", description="Compress transformer KV caches, with fidelity measured.")
    parser.add_argument("--version", action="version", version=f"kvshrink {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS:
        cmd.add_parser(sub)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        fail(f"no command given; valid commands: {', '.join(sub.choices)}")
    return run_cli(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
