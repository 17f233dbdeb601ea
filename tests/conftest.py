"""Shared fixtures. The real model loads once per session (it takes ~20 s on 2 cores)."""

from __future__ import annotations

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported, which can be long before
# tests/kernels/conftest.py runs (torch and the cache tests import it): set it here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def single_thread():
    """One intra-op thread: on a shared 2-core machine two threads thrash (10x slower). The model
    test packages (tests/cache, tests/policies) use it as their package-scoped autouse fixture."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gaussian_kv(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian vectors with a few outlier channels, like real keys."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., :2] *= 6.0
    return x.to(dtype)


@pytest.fixture(scope="session")
def smollm2():
    from kvshrink.models import load_model

    return load_model("smollm2-135m")
