"""Attention straight from rotation-codec codes, by table lookup (product-quantization scans).

A decode query scores a packed key ``k = s·Πᵀ[c_{i_1}, …, c_{i_m}]`` as
``q·k = s · Σ_b (Πq)_b · c_{i_b}``: one table of ``m x N`` block–codeword dot products per query
row, then per token ``m`` lookups and a sum. Values go the other way: the attention weights
``p_t·s_t`` are summed per (block, codeword) into a histogram, which meets the codebook once,
and the result is rotated back once by the caller's accumulator. No key or value is ever
materialized, so a decode step reads the codes (a byte per block at N = 256) instead of
writing and re-reading 4-byte floats. Measured on the shared 2-core CPU (one layer, 8192
tokens, 3 KV heads, d = 64): FibQuant b=2 k=4 went from 2.9x to 2.4x the time of SDPA over
float32 keys; for TurboQuant (k = 1, 64 lookups per token) lookups were slower than decoding,
so scalar codebooks decode.

Used only where it pays: few query rows (decode and short forwards; the table is
``rows x m x N``), vector codebooks (k >= 2) whose blocks carry just codes and norms (no QJL
sketch, sinks, windows or means), keys coded after RoPE. Everything else decodes.
:func:`lut_group` returns None in those cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codecs import Codec
from ..codecs.primitives.mixed_radix import unpack_indices
from ..kernels.lut_cpu import available as compiled_available
from ..kernels.lut_cpu import lut_histogram, lut_scores
from .segment import Segment

__all__ = ["LUT_MAX_ROWS", "PackedKeys", "PackedValues", "lut_group"]

#: query rows (query heads of a group x query tokens) up to which lookups beat decoding
LUT_MAX_ROWS = 64


def _use_compiled(compiled: bool | None, x: torch.Tensor) -> bool:
    if compiled is None:
        return x.device.type == "cpu" and compiled_available()
    return compiled


@dataclass
class _Codes:
    idx: torch.Tensor  # [B, Hkv, T, m] int64 codeword indices, offset by block (b * N)
    norm: torch.Tensor  # [B, Hkv, T] float32
    book: torch.Tensor  # [N, k] float32
    d: int  # head dim (m * k >= d; the tail is zero padding)

    @property
    def blocks(self) -> int:
        return self.idx.shape[-1]


class PackedKeys(_Codes):
    """Keys of a chunk as codes; ``scores(q)`` for rotated queries ``[B, Hkv, R, d]``."""

    def scores(self, q: torch.Tensor, compiled: bool | None = None) -> torch.Tensor:
        """``compiled``: the numba loop (default on CPU when available) or PyTorch's gather."""
        b, h, r, _ = q.shape
        m, (n, k) = self.blocks, self.book.shape
        t = self.idx.shape[2]
        if m * k > self.d:
            q = torch.nn.functional.pad(q, (0, m * k - self.d))
        table = torch.matmul(q.reshape(b, h, r, m, k), self.book.T)  # [B, H, R, m, N]
        flat = table.reshape(b, h, r, m * n)
        if _use_compiled(compiled, q):
            return lut_scores(self.idx, flat, self.norm)
        look = torch.gather(flat, 3, self.idx.reshape(b, h, 1, t * m).expand(b, h, r, t * m))
        return look.view(b, h, r, t, m).sum(-1) * self.norm[:, :, None, :]


class PackedValues(_Codes):
    """Values of a chunk as codes; ``weighted(p)`` = ``p @ (rotated values)`` ``[B, Hkv, R, d]``."""

    def weighted(self, p: torch.Tensor, compiled: bool | None = None) -> torch.Tensor:
        """``compiled``: the numba loop (default on CPU when available) or PyTorch's scatter_add."""
        b, h, r, t = p.shape
        m, (n, k) = self.blocks, self.book.shape
        if _use_compiled(compiled, p):
            hist = lut_histogram(self.idx, p * self.norm[:, :, None, :], m * n).to(p.dtype)
        else:
            w = (p * self.norm[:, :, None, :]).unsqueeze(-1).expand(b, h, r, t, m).reshape(b, h, r, t * m)
            hist = torch.zeros(b, h, r, m * n, dtype=p.dtype, device=p.device)
            hist.scatter_add_(3, self.idx.reshape(b, h, 1, t * m).expand(b, h, r, t * m), w)
        out = torch.matmul(hist.view(b, h, r, m, n), self.book)  # [B, H, R, m, k]
        return out.reshape(b, h, r, m * k)[..., : self.d]


def _eligible(codec: Codec) -> bool:
    cfg = codec.config
    return (
        hasattr(codec, "decode_rotated")
        and not getattr(cfg, "prerope", False)
        and not getattr(cfg, "center", False)
        and not getattr(cfg, "pca", 0)
        and getattr(codec, "extra_bits", 1) == 0
        and getattr(codec, "k", 1) >= 2  # scalar codebooks: d lookups per token lost to decoding
    )


def lut_group(codec: Codec, group: list[Segment]) -> tuple[PackedKeys, PackedValues] | None:
    """Codes of consecutive packed segments as lookup-ready keys and values, or None."""
    if not _eligible(codec):
        return None
    out = []
    for role, name in (("key", "keys"), ("value", "values")):
        rows = []
        for r in range(len(getattr(group[0], name))):
            joined = codec.concat_tokens([getattr(s, name)[r] for s in group])
            if joined is None or set(joined.tensors) != {"codes", "norm"}:
                return None
            rows.append(joined)
        d = rows[0].shape[-1]
        n = codec.levels(role)  # type: ignore[attr-defined]
        m = codec.blocks(d)  # type: ignore[attr-defined]
        idx = torch.stack([unpack_indices(p.tensors["codes"], n, m) for p in rows])
        idx = idx + torch.arange(m, device=idx.device) * n
        norm = torch.stack([p.tensors["norm"] for p in rows]).float()
        book = codec.codebook(d, role, idx.device)  # type: ignore[attr-defined]
        cls = PackedKeys if role == "key" else PackedValues
        out.append(cls(idx, norm, book, d))
    return out[0], out[1]  # type: ignore[return-value]
