"""CLI plumbing shared by subcommands: one-line errors, exit codes, progress bars."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = ["Parser", "fail", "progress_bar"]


def fail(message: str) -> NoReturn:
    """Print one line and exit 2 (bad input never gets a traceback)."""
    print(f"kvshrink: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see `{self.prog} --help`)")


def progress_bar(desc: str):
    def make(total: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)

    return make
