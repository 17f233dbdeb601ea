"""One intra-op thread for the model tests: on a shared 2-core machine two threads thrash."""

from __future__ import annotations

import pytest

from ..conftest import single_thread

one_thread = pytest.fixture(scope="package", autouse=True, name="one_thread")(single_thread)
