"""The benchmark scripts are command lines too: bad input is one line on stderr and exit 2.

Each case fails before a model loads, so this stays fast; what it guards is the wrapper
(``kvshrink.cli.common.run_cli``) that every script's ``__main__`` goes through.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["layer_sensitivity.py", "--roles", "bogus"], "--roles: give key, value or key,value"),  # SpecError
        (["layer_sensitivity.py", "--allocate", "--template", "nosuch:b={kb}"], "unknown codec 'nosuch'"),
        (["layer_sensitivity.py", "--allocate", "--heads", "nosuch.json"], "--heads: no file nosuch.json"),
        (
            ["head_sensitivity.py", "--role", "both", "--codec", "fibquant:b=2,k=4"],
            "--role: give key or value",
        ),
        (
            ["longbench_smollm2.py", "--levels", "3"],
            "--levels: expected a subset of [4, 8]",
        ),  # SystemExit(str)
    ],
)
def test_bad_input_is_one_line_exit_2(argv: list[str], match: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith("kvshrink: error: ") and match in lines[0]
