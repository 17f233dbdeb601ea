"""Principal key directions held apart: code each key's coefficients along its head's top ``r``
directions with a few bits of uniform scalar code, and the residual with the codec.

Why: a rotation codec spends the same rate on every coordinate of the (normalized, rotated)
vector, which is optimal only for an isotropic source. SmolLM2's keys are far from isotropic:
about half of their energy lies along one per-head direction (the "mean" direction) and most of
the rest in a handful more. Transform coding says to give high-variance directions more bits
(reverse water-filling); the cheap form of that is to take the top ``r`` eigen-directions of the
keys' second moment out of the vector, store their coefficients at ``bits`` bits each (uniform,
one fp16 scale per direction), and let the codec code what is left, whose norm is then much
smaller. On SmolLM2-135M (one 2048-token window, attention KL of 128 held-out continuation
queries summed over layers) keys at 2.75 bits plus two 8-bit coefficients (3.15 bits in all)
gave KL 0.385 against 0.546 for 3-bit keys with the query-fitted transform (``white=4``) at the
same bytes, and 0.927 for plain 3-bit keys.

Unlike ``center`` (one stored mean for all tokens, which worsened perplexity), each token keeps
its own coefficient, so the score offsets ``q·k`` along the dominant directions stay right.

Stored (per block of coded tokens, ``[...]`` the leading dims such as ``[B, Hkv]``):
``pu`` fp16 ``[..., r, d]`` (orthonormal rows, rounded), ``ps`` fp16 ``[..., r]`` (step of the
uniform code), ``pc`` int8 ``[..., T, r]`` (codes in ``[-(2^(bits-1)-1), 2^(bits-1)-1]``; for
``bits < 8`` they are packed, two 4-bit codes per byte). Encode and decode both use the stored,
rounded ``pu`` and ``ps``, so the residual the codec sees is exactly what decode adds back to.
"""

from __future__ import annotations

import torch

__all__ = ["BITS", "decode", "fit", "nbytes_per_token", "split"]

BITS = (4, 8)  # coefficient widths with a whole-byte layout (two 4-bit codes per byte)


def fit(x: torch.Tensor, rank: int) -> torch.Tensor:
    """The top ``rank`` eigen-directions of ``x``'s second moment, fp16 ``[..., r, d]``, for
    ``x`` ``[..., T, d]``. Deterministic: each row's sign is fixed so its largest entry is positive."""
    x64 = x.to(torch.float64)
    m = x64.transpose(-1, -2) @ x64
    _, vec = torch.linalg.eigh(m)  # ascending eigenvalues
    u = vec[..., -rank:].flip(-1).transpose(-1, -2)  # [..., r, d], largest first
    big = u.abs().argmax(-1, keepdim=True)
    sign = torch.gather(u, -1, big).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (u * sign).to(torch.float16).contiguous()


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes.to(torch.int8).contiguous()
    r = codes.shape[-1]
    u = (codes + 8).to(torch.uint8)  # 4-bit codes in -7..7 -> 1..15
    if r % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    return (u[..., 0::2] | (u[..., 1::2] << 4)).view(torch.int8).contiguous()


def _unpack(packed: torch.Tensor, bits: int, rank: int) -> torch.Tensor:
    if bits == 8:
        return packed.to(torch.float32)
    u = packed.view(torch.uint8)
    lo, hi = (u & 0xF).to(torch.float32) - 8, (u >> 4).to(torch.float32) - 8
    return torch.stack((lo, hi), -1).flatten(-2)[..., :rank]


def split(x: torch.Tensor, u: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(residual float32 [..., T, d], ps fp16 [..., r], pc int8 [..., T, r or r/2])`` of ``x``
    ``[..., T, d]`` along the stored directions ``u``; the residual is taken against the
    *decoded* coefficients, so residual + :func:`decode` reproduces ``x`` up to the codec's error."""
    uf = u.to(torch.float32)
    coef = x.to(torch.float32) @ uf.transpose(-1, -2)  # [..., T, r]
    top = float(2 ** (bits - 1) - 1)
    if coef.shape[-2]:
        step = coef.abs().amax(-2) / top
    else:
        step = torch.zeros(coef.shape[:-2] + coef.shape[-1:], device=x.device)
    # fp16's smallest normal: a direction with no energy in this block gets code 0, not 0/0
    step = step.clamp_min(torch.finfo(torch.float16).tiny).to(torch.float16)
    codes = torch.round(coef / step.to(torch.float32).unsqueeze(-2)).clamp(-top, top)
    res = x.to(torch.float32) - (codes * step.to(torch.float32).unsqueeze(-2)) @ uf
    return res, step.contiguous(), _pack(codes, bits)


def decode(u: torch.Tensor, ps: torch.Tensor, pc: torch.Tensor, bits: int) -> torch.Tensor:
    """The coded tokens' part along the directions, float32 ``[..., T, d]``."""
    rank = u.shape[-2]
    coef = _unpack(pc, bits, rank) * ps.to(torch.float32).unsqueeze(-2)
    return coef @ u.to(torch.float32)


def nbytes_per_token(rank: int, bits: int) -> int:
    """Bytes of ``pc`` per coded token."""
    return rank if bits == 8 else -(-rank // 2)
