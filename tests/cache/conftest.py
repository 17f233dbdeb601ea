"""Fixtures for the cache harness: Gemma 3 loaded once, prompts cut from the embedded essays."""

from __future__ import annotations

import pytest

from ..conftest import single_thread


@pytest.fixture(scope="session")
def gemma():
    from kvshrink.models import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="session")
def essay() -> str:
    from kvshrink.data import load_text

    return load_text("paul-graham")


def prompt(tokenizer, text: str, n_tokens: int, offset: int = 0) -> str:
    """About ``n_tokens`` tokens of ``text`` starting at character ``offset``."""
    ids = tokenizer(text[offset : offset + 8 * n_tokens], add_special_tokens=False).input_ids[:n_tokens]
    return tokenizer.decode(ids)


one_thread = pytest.fixture(scope="package", autouse=True, name="one_thread")(single_thread)
