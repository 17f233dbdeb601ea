"""Fused rotation + nearest-codeword + pack + norm, one pass over the new keys or values.

One program encodes ``BM`` vectors: the fp32 norm, ``y = Π u`` as an fp32 ``tl.dot`` (IEEE, to
match the torch encode), a running argmin over the ``N`` codewords of ``‖c‖² − 2⟨y_j, c⟩`` (strict
``<`` keeps the first index on ties, as ``torch.argmin``), then the indices are packed into
``pack_rows`` words in registers and stored with the fp16 norm at the row ``start[b] + t``, so a
prefill chunk and a decode step's single token share the kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import CodeLayout

__all__ = ["encode_vq_triton"]


@triton.jit
def _encode_kernel(
    x_ptr,
    rot_ptr,
    cb_ptr,
    cn2_ptr,
    codes_ptr,
    norm_ptr,
    start_ptr,
    M,
    T,
    Hkv,
    TCAP,
    D: tl.constexpr,
    BM: tl.constexpr,
    VEC: tl.constexpr,
    NLEV: tl.constexpr,
    BITS: tl.constexpr,
    P: tl.constexpr,
    NW: tl.constexpr,
    WB: tl.constexpr,
    RB: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < M
    d = tl.arange(0, D)
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0)
    x = x.to(tl.float32)  # [BM, D]
    nrm = tl.sqrt(tl.sum(x * x, 1))
    u = x / tl.maximum(nrm, 1.1754943508222875e-38)[:, None]
    rot_t = tl.load(rot_ptr + d[None, :] * D + d[:, None])  # [D, D]: Πᵀ
    y = tl.dot(u, rot_t, input_precision="tf32x3")  # [BM, D] rotated unit vectors (3xTF32 ~ fp32)
    best = tl.full((BM, D // VEC), float("inf"), tl.float32)
    arg = tl.zeros((BM, D // VEC), tl.int32)
    if VEC == 1:  # scalar levels: no block axis to reduce
        for n in range(NLEV):
            dist = tl.load(cn2_ptr + n) - 2.0 * (y * tl.load(cb_ptr + n))  # [BM, D]
            better = dist < best
            best = tl.where(better, dist, best)
            arg = tl.where(better, n, arg)
    else:
        y3 = tl.reshape(y, (BM, D // VEC, VEC))
        cv = tl.arange(0, VEC)
        for n in range(NLEV):
            c = tl.load(cb_ptr + n * VEC + cv)  # [VEC]
            dist = tl.load(cn2_ptr + n) - 2.0 * tl.sum(y3 * c[None, None, :], 2)  # [BM, R]
            better = dist < best
            best = tl.where(better, dist, best)
            arg = tl.where(better, n, arg)
    shifts = tl.arange(0, P) * BITS
    words = tl.sum(tl.reshape(arg, (BM, NW, P)) << shifts[None, None, :], 2)  # [BM, NW]
    bh = rows // T
    st = tl.load(start_ptr + bh // Hkv, mask=rmask, other=0)
    orow = bh.to(tl.int64) * TCAP + st + rows % T
    w = tl.arange(0, NW)
    base = codes_ptr + orow[:, None] * RB
    if WB == 1:
        tl.store(base + w[None, :], words.to(tl.uint8), mask=rmask[:, None])
    else:
        tl.store(base + 3 * w[None, :], (words & 255).to(tl.uint8), mask=rmask[:, None])
        tl.store(base + 3 * w[None, :] + 1, ((words >> 8) & 255).to(tl.uint8), mask=rmask[:, None])
        tl.store(base + 3 * w[None, :] + 2, ((words >> 16) & 255).to(tl.uint8), mask=rmask[:, None])
    tl.store(norm_ptr + orow, nrm.to(tl.float16), mask=rmask)


def encode_vq_triton(
    x: torch.Tensor,
    rotation: torch.Tensor,
    codebook: torch.Tensor,
    layout: CodeLayout,
    codes_out: torch.Tensor,
    norm_out: torch.Tensor,
    start: torch.Tensor,
    block: int = 32,
    num_warps: int = 8,
) -> None:
    """Encode ``x`` [B, Hkv, T, d] into ``codes_out``/``norm_out`` [B, Hkv, TCAP, ...] at ``start[b]+t``."""
    b, hkv, t, d = x.shape
    m = b * hkv * t
    cb = codebook.float().contiguous()
    cn2 = (cb * cb).sum(-1)  # [N] ‖c‖², tiny
    grid = (triton.cdiv(m, block),)
    _encode_kernel[grid](
        x.contiguous(),
        rotation.float().contiguous(),
        cb,
        cn2,
        codes_out,
        norm_out,
        start.to(device=x.device, dtype=torch.int32).contiguous(),
        m,
        t,
        hkv,
        codes_out.shape[2],
        d,
        block,
        layout.vec,
        layout.levels,
        layout.bits,
        layout.per_word,
        d // layout.vec // layout.per_word,
        layout.word_bytes,
        layout.row_bytes(d),
        num_warps=num_warps,
    )
