"""Kernel tests: the Triton interpreter on CPU, NaN-filled outputs so unwritten lanes fail."""

from __future__ import annotations

import os

import pytest
import torch

# Before anything imports triton: without a GPU, kernels run in the interpreter (the CI path).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_numpy2_shim() -> None:
    """Let the Triton interpreter use loaded scalars as loop bounds under numpy >= 2.3.

    The interpreter keeps scalars as 1-element arrays and converts them with ``int(array)``,
    which numpy 2.3+ refuses for ``ndim > 0`` (seen with triton 3.6, numpy 2.4). Compiled
    kernels are unaffected; this only patches the interpreter's tensor ``__index__``.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    if getattr(original, "__name__", "") != "patched":
        interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_numpy2_shim()


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.empty`` returns NaN-filled float tensors (and 0xAB-filled integer ones)."""
    real = torch.empty

    def poisoned(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.uint8:
            t.fill_(0xAB)
        return t

    monkeypatch.setattr(torch, "empty", poisoned)
