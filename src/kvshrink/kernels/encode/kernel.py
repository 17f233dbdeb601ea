"""Fused rotation + nearest-codeword + pack + norm, one pass over the new keys or values.

One program encodes ``BM`` vectors: the fp32 norm, ``y = Π u`` as a 3xTF32 ``tl.dot`` (about fp32,
to match the torch encode), the nearest codeword of each ``vec``-block by ``‖c‖² − 2⟨y_j, c⟩``
(first index on ties, as ``torch.argmin``), then the indices are packed into ``pack_rows`` words in
registers and stored with the fp16 norm at the row ``start[b] + t``, so a prefill chunk and a
decode step's single token share the kernel.

Two searches for the nearest codeword:

- a running argmin over the ``N`` codewords on CUDA cores (strict ``<``): ``N·d`` multiply-adds
  per vector, fine for scalar levels and small codebooks;
- ``MMA`` (the default for 8- and 16-wide blocks of >= 64 codewords, :func:`~.pad.mma_ok`): every
  ``⟨y_j, c_n⟩`` on tensor cores. The blocks of ``y`` become the rows of a ``[BM·R, KP]`` tile,
  zero-padded to ``KP = 16`` coordinates (the tensor-core K) by interleaving zeros; one
  ``tl.dot`` against the codebook padded the same way (``[KP, BN]``) scores ``BN`` codewords per
  chunk, and a per-chunk ``tl.argmin`` (leftmost on ties) with a strict ``<`` across chunks keeps
  the first index. The padding wastes tensor-core work that costs nothing here: the CUDA-core search was
  18-39% of a 32k prefill's attention at ``N = 256`` (docs/results/decode-attention-h100-notes.md).
- ``KEYED`` (the MMA search for ``N <= 256``): two spare padded columns carry ``1`` and ``‖y_j‖²/2``
  against codebook rows ``−‖c‖²/2`` and ``−1`` (:func:`~.pad.pad_codebook`), so the dot itself
  returns ``−‖y_j − c‖²/2 <= 0``. The bits of a non-positive float, read as int32, order like
  the distance, so with the low ``log2 N`` bits replaced by the codeword's index one int ``min``
  per score keeps distance and index together: no separate ``argmin``, no ``‖c‖²`` load. Two
  codewords closer than ``2^(log2 N - 23)`` of the distance (relative) count as tied and the
  first index wins, as a float tie does in ``torch.argmin``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import CodeLayout
from .pad import KP, keyed_supported, mma_supported, pad_codebook, resolve_search

__all__ = ["encode_vq_triton"]


@triton.jit
def _halve(x, BM: tl.constexpr, R: tl.constexpr, W: tl.constexpr):
    """``[BM, R, W]`` -> its even and odd coordinates, ``[BM, R, W // 2]`` each (``[BM, R]`` at W=2)."""
    if W == 2:
        a, b = tl.split(x)
    else:
        a, b = tl.split(tl.reshape(x, (BM, R, W // 2, 2)))
    return a, b


@triton.jit
def _coords(y, BM: tl.constexpr, R: tl.constexpr, VEC: tl.constexpr):
    """The ``VEC`` coordinate tiles ``[BM, R]`` of ``y`` ``[BM, R·VEC]`` cut into blocks, in order."""
    y3 = tl.reshape(y, (BM, R, VEC))
    if VEC == 2:
        c0, c1 = _halve(y3, BM, R, 2)
        out = (c0, c1)
    elif VEC == 4:
        e, o = _halve(y3, BM, R, 4)  # coordinates (0, 2) and (1, 3)
        c0, c2 = _halve(e, BM, R, 2)
        c1, c3 = _halve(o, BM, R, 2)
        out = (c0, c1, c2, c3)
    else:
        e, o = _halve(y3, BM, R, 8)  # (0, 2, 4, 6) and (1, 3, 5, 7)
        ee, eo = _halve(e, BM, R, 4)  # (0, 4), (2, 6)
        oe, oo = _halve(o, BM, R, 4)  # (1, 5), (3, 7)
        c0, c4 = _halve(ee, BM, R, 2)
        c2, c6 = _halve(eo, BM, R, 2)
        c1, c5 = _halve(oe, BM, R, 2)
        c3, c7 = _halve(oo, BM, R, 2)
        out = (c0, c1, c2, c3, c4, c5, c6, c7)
    return out


@triton.jit
def _argmin_loop(
    y,
    cb_ptr,
    cn2_ptr,
    BM: tl.constexpr,
    D: tl.constexpr,
    VEC: tl.constexpr,
    NLEV: tl.constexpr,
):
    """``[BM, D // VEC]`` nearest-codeword indices of ``y`` by a running argmin on CUDA cores
    (strict ``<`` in index order keeps the first index; the compiler unrolls 4-8 codewords per
    trip on its own)."""
    best = tl.full((BM, D // VEC), float("inf"), tl.float32)
    arg = tl.zeros((BM, D // VEC), tl.int32)
    if VEC == 1:  # scalar levels: no block axis to reduce
        for n in range(NLEV):
            dist = tl.load(cn2_ptr + n) - 2.0 * (y * tl.load(cb_ptr + n))  # [BM, D]
            better = dist < best
            best = tl.where(better, dist, best)
            arg = tl.where(better, n, arg)
    elif VEC > 8:  # no coordinate split written past 8: the block axis summed (across lanes)
        y3 = tl.reshape(y, (BM, D // VEC, VEC))
        cv = tl.arange(0, VEC)
        for n in range(NLEV):
            c = tl.load(cb_ptr + n * VEC + cv)  # [VEC]
            dist = tl.load(cn2_ptr + n) - 2.0 * tl.sum(y3 * c[None, None, :], 2)  # [BM, R]
            better = dist < best
            best = tl.where(better, dist, best)
            arg = tl.where(better, n, arg)
    else:
        # one [BM, R] tile per block coordinate, so a distance is VEC thread-local FMAs against
        # scalar codeword coordinates: a [BM, R, VEC] product summed over its last axis put that
        # axis across lanes, two shuffles and 17 SASS per distance (kernel_sass.py --encode)
        R: tl.constexpr = D // VEC
        ys = _coords(y, BM, R, VEC)
        for n in range(NLEV):
            dist = tl.load(cn2_ptr + n) + ys[0] * (-2.0 * tl.load(cb_ptr + n * VEC))  # [BM, R]
            for c in tl.static_range(1, VEC):
                dist += ys[c] * (-2.0 * tl.load(cb_ptr + n * VEC + c))
            better = dist < best
            best = tl.where(better, dist, best)
            arg = tl.where(better, n, arg)
    return arg


@triton.jit
def _pad_blocks(yb, M: tl.constexpr, VEC: tl.constexpr, KP: tl.constexpr):
    """``[M, VEC]`` block rows zero-padded to ``[M, KP]`` by interleaving (constexpr ifs):
    coordinate ``c`` lands on column ``c·(KP // VEC)``, where :func:`~.pad.pad_codebook` puts it."""
    if VEC <= KP // 2:
        yb = tl.reshape(tl.join(yb, tl.zeros_like(yb)), (M, 2 * VEC))
    if VEC <= KP // 4:
        yb = tl.reshape(tl.join(yb, tl.zeros_like(yb)), (M, 4 * VEC))
    if VEC <= KP // 8:
        yb = tl.reshape(tl.join(yb, tl.zeros_like(yb)), (M, 8 * VEC))
    return yb


@triton.jit
def _argmin_mma(
    y,
    cp_ptr,
    cn2_ptr,
    BM: tl.constexpr,
    D: tl.constexpr,
    VEC: tl.constexpr,
    NLEV: tl.constexpr,
    KP: tl.constexpr,
    BN: tl.constexpr,
):
    """``[BM, D // VEC]`` nearest-codeword indices of ``y`` with the scores on tensor cores."""
    R: tl.constexpr = D // VEC
    yb = tl.reshape(y, (BM * R, VEC))  # blocks as rows
    yb = _pad_blocks(yb, BM * R, VEC, KP)
    kp = tl.arange(0, KP)
    nb = tl.arange(0, BN)
    best = tl.full((BM * R,), float("inf"), tl.float32)
    arg = tl.zeros((BM * R,), tl.int32)
    for n0 in range(0, NLEV, BN):
        c = tl.load(cp_ptr + kp[:, None] * NLEV + (n0 + nb)[None, :])  # [KP, BN]
        s = tl.dot(yb, c, input_precision="tf32x3")  # [BM·R, BN]
        dist = tl.load(cn2_ptr + n0 + nb)[None, :] - 2.0 * s
        m = tl.min(dist, 1)
        a = tl.argmin(dist, 1, tie_break_left=True).to(tl.int32) + n0
        better = m < best
        best = tl.where(better, m, best)
        arg = tl.where(better, a, arg)
    return tl.reshape(arg, (BM, R))


@triton.jit
def _argmin_keyed(
    y,
    cp_ptr,
    BM: tl.constexpr,
    D: tl.constexpr,
    VEC: tl.constexpr,
    NLEV: tl.constexpr,
    KP: tl.constexpr,
    BN: tl.constexpr,
    IB: tl.constexpr,
):
    """``[BM, D // VEC]`` nearest-codeword indices, distance and index in one int32 per score."""
    R: tl.constexpr = D // VEC
    yb = tl.reshape(y, (BM * R, VEC))
    half_sq = 0.5 * tl.sum(yb * yb, 1)  # ‖y_j‖²/2 per block
    yb = _pad_blocks(yb, BM * R, VEC, KP)
    kp = tl.arange(0, KP)
    # spare columns 1 and 3 (coordinates sit on multiples of KP // VEC >= 2): 1 and ‖y_j‖²/2
    yb = yb + tl.where(kp == 1, 1.0, 0.0)[None, :] + tl.where(kp == 3, 1.0, 0.0)[None, :] * half_sq[:, None]
    nb = tl.arange(0, BN)
    low: tl.constexpr = (1 << IB) - 1
    best = tl.full((BM * R,), 2147483647, tl.int32)
    for n0 in range(0, NLEV, BN):
        c = tl.load(cp_ptr + kp[:, None] * NLEV + (n0 + nb)[None, :])  # [KP, BN]
        s = tl.dot(yb, c, input_precision="tf32x3")  # −‖y_j − c‖²/2, up to rounding
        s = tl.minimum(s, -0.0)  # a rounded-positive near-match must not sort last
        key = (s.to(tl.int32, bitcast=True) & ~low) | (n0 + nb)[None, :]
        best = tl.minimum(best, tl.min(key, 1))
    return tl.reshape(best & low, (BM, R))


@triton.jit
def _encode_kernel(
    x_ptr,
    rot_ptr,
    cb_ptr,
    cp_ptr,
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
    MMA: tl.constexpr,
    KP: tl.constexpr,
    BN: tl.constexpr,
    KEYED: tl.constexpr,
    IB: tl.constexpr,
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
    if KEYED:
        arg = _argmin_keyed(y, cp_ptr, BM, D, VEC, NLEV, KP, BN, IB)
    elif MMA:
        arg = _argmin_mma(y, cp_ptr, cn2_ptr, BM, D, VEC, NLEV, KP, BN)
    else:
        arg = _argmin_loop(y, cb_ptr, cn2_ptr, BM, D, VEC, NLEV)
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
    block: int | None = None,
    num_warps: int | None = None,
    mma: bool | None = None,
    padded: torch.Tensor | None = None,
    bn: int = 64,
    cn2: torch.Tensor | None = None,
    keyed: bool | None = None,
    maxnreg: int | None = None,
) -> None:
    """Encode ``x`` [B, Hkv, T, d] into ``codes_out``/``norm_out`` [B, Hkv, TCAP, ...] at ``start[b]+t``.

    ``mma``: the tensor-core search; ``keyed``: its one-int ``min`` form (None for either: the
    measured default, :func:`~.pad.resolve_search`); ``padded``: its :func:`pad_codebook`,
    and ``cn2``, the codewords' squared norms: built here when not given (callers cache them);
    ``maxnreg``: a register cap per thread (CUDA only; None: the compiler's choice)."""
    b, hkv, t, d = x.shape
    m = b * hkv * t
    cb = codebook.float().contiguous()
    cn2 = (cb * cb).sum(-1) if cn2 is None else cn2  # [N] ‖c‖² (callers cache it)
    use_mma, use_keyed = resolve_search(layout, d, mma, keyed)
    block = block or 32  # for the tensor-core search: the fastest of an H100 sweep at k=8 (BN=64, 8 warps)
    # the CUDA-core loop at 4 warps: 2.47 ms vs 3.28 at 8 for fibquant:b=2,k=4, 32k tokens (H100,
    # benchmarks/encode_sweep.py, docs/results/decode-attention-encode-regs-sweep-h100.json)
    num_warps = num_warps or (8 if use_mma else 4)
    cp = cb  # unused by the loop
    if use_mma:
        assert mma_supported(layout, d) and layout.levels >= bn, f"no tensor-core search for {layout}"
        cp = padded if padded is not None else pad_codebook(cb)
    assert not use_keyed or keyed_supported(layout, d), f"no keyed search for {layout}"
    grid = (triton.cdiv(m, block),)
    _encode_kernel[grid](
        x.contiguous(),
        rotation.float().contiguous(),
        cb,
        cp,
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
        use_mma,
        KP,
        bn,
        use_keyed,
        max(1, (layout.levels - 1).bit_length()),
        num_warps=num_warps,
        **({} if maxnreg is None else {"maxnreg": int(maxnreg)}),
    )
