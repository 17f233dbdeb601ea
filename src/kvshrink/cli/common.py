"""CLI plumbing shared by subcommands: one-line errors, exit codes, progress bars."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

__all__ = ["Parser", "fail", "progress_bar", "run_cli"]


def fail(message: str) -> NoReturn:
    """Print one line and exit 2 (bad input never gets a traceback)."""
    print(f"kvshrink: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_cli(main: Callable[[], int | None]) -> int:
    """Run a script's ``main`` with the CLI's contract: a library error (``KvshrinkError``) or a
    ``SystemExit`` carrying a message becomes one line on stderr and exit 2, never a traceback.

    Why here: the benchmark scripts are command lines too, and a bad spec passed to one of them
    used to end in a stack trace."""
    from ..core.errors import KvshrinkError

    try:
        return main() or 0
    except KvshrinkError as exc:
        fail(str(exc))
    except SystemExit as exc:
        if isinstance(exc.code, str):
            fail(exc.code)
        raise
    except KeyboardInterrupt:
        print("kvshrink: interrupted", file=sys.stderr)
        return 130


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see `{self.prog} --help`)")


def progress_bar(desc: str):
    def make(total: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)

    return make
