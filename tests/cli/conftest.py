"""Benchmark scripts imported as modules (their helpers are tested here, not only their CLIs)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench_module():
    """``bench_module("layer_sensitivity")``: import a script of ``benchmarks/``, path restored after."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
