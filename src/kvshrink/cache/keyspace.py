"""A layer's query-aware key basis (``white=r`` in a cache spec): keys held as A·k, queries read as A⁻¹·q.

Attention only sees keys through ``q·k = (A⁻¹q)·(Ak)`` (A symmetric), so a layer that stores
``A·k`` everywhere (window, packed blocks, page digests, compensation entries) and turns each
query by ``A⁻¹`` computes the same scores, while the codec's near-isotropic error on ``A·k``
lands where this layer's queries do not look (:mod:`kvshrink.codecs.primitives.whiten` has the
maths and the frontier measurements). Every reader of the layer (policies, pages, kernels, the
rotated-basis path) works unchanged in that basis.

A is fitted once, at the layer's first forward, to that forward's queries and keys, per batch
row and KV head (padding columns zeroed, which the fit ignores), and kept: ``A = I + Uᵀdiag(s)U``
with orthonormal fp32 rows ``U`` ``[B, Hkv, r, d]`` and ``s`` ``[B, Hkv, r]``, counted in the
layer's bookkeeping bytes. With orthonormal ``U``, ``A⁻¹ = I - Uᵀdiag(s/(1+s))U``: both
directions cost ``O(r·d)`` per vector and no dense ``d x d`` matrix is held.
"""

from __future__ import annotations

import torch

from ..codecs.primitives import whiten

__all__ = ["KeyTransform"]


class KeyTransform:
    """``u`` ``[B, Hkv, r, d]`` and ``s`` ``[B, Hkv, r]`` float32; see the module docstring."""

    def __init__(self, u: torch.Tensor, s: torch.Tensor) -> None:
        self.u, self.s = u, s

    @classmethod
    def fit(
        cls,
        query: torch.Tensor,
        keys: torch.Tensor,
        valid: torch.Tensor | None,
        rank: int,
        shrink: float,
    ) -> KeyTransform:
        """From ``query`` ``[B, Hq, Q, d]`` and ``keys`` ``[B, Hkv, T, d]`` of one forward (same
        columns, Q = T); ``valid`` ``[B, T]`` bool marks the columns that are not padding."""
        q, k = query.float(), keys.float()
        if valid is not None:
            q = q * valid[:, None, -q.shape[2] :, None]
            k = k * valid[:, None, -k.shape[2] :, None]
        u, s = whiten.fit(whiten.group_queries(q, k.shape[1]), k, rank, shrink, dtype=torch.float32)
        return cls(u, s)

    def keys(self, k: torch.Tensor) -> torch.Tensor:
        """``A·k`` for ``[B, Hkv, T, d]``, in ``k``'s dtype."""
        kf = k.float()
        return (kf + ((kf @ self.u.transpose(-1, -2)) * self.s.unsqueeze(-2)) @ self.u).to(k.dtype)

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        """``A⁻¹·q`` for ``[B, Hq, Q, d]`` (query head ``h`` reads KV head ``h // (Hq/Hkv)``)."""
        qf = whiten.group_queries(q.float(), self.u.shape[1])
        t = self.s / (1.0 + self.s)
        out = qf - ((qf @ self.u.transpose(-1, -2)) * t.unsqueeze(-2)) @ self.u
        return out.reshape(q.shape).to(q.dtype)

    def index_rows(self, idx: torch.Tensor) -> None:
        self.u, self.s = self.u.index_select(0, idx), self.s.index_select(0, idx)

    def nbytes(self) -> int:
        return self.u.numel() * self.u.element_size() + self.s.numel() * self.s.element_size()
