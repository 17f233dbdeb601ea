"""``kvshrink`` command line. Subcommands register in ``COMMANDS``; errors are one line, exit 2."""

from __future__ import annotations

import sys

from . import frontier, longbench
from .common import Parser, fail

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
    from ..core.errors import KvshrinkError

    try:
        return args.func(args)
    except KvshrinkError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        print("kvshrink: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
