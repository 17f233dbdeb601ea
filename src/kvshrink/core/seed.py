"""Deterministic seeding.

Rotations and codebooks must be bit-identical on any machine for the same spec, so they are
drawn from a private CPU ``torch.Generator`` in float64 and only then cast and moved.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derive_seed", "generator"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` (stable across runs and platforms)."""
    text = "|".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded from ``parts``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(*parts))
    return g
