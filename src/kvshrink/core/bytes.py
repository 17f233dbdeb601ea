"""Byte accounting from the tensors actually held.

Compression ratios in kvshrink are never computed from a nominal bit width: they come from
summing ``numel * element_size`` over every tensor a representation keeps (codes, scales,
zero-points, norms, full-precision windows, codebooks).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["fp16_nbytes", "tensor_nbytes"]


def tensor_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Sum of the storage bytes of ``tensors``."""
    return int(sum(t.numel() * t.element_size() for t in tensors))


def fp16_nbytes(numel: int) -> int:
    """Bytes the same elements take in fp16, the baseline of every compression ratio."""
    return 2 * int(numel)
