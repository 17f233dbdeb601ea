"""Device-side tile helpers of the split kernels (word reads and level selects are shared with
the sub-stream kernel): load code words, unpack indices in
stream-major order, turn them into fp16 values (dequantized, or codewords of a rotation codec).

Stream-major order: position ``(r, w, c)`` of a ``[BT, D]`` tile holds coordinate ``c`` of
index ``P·w + r``, so one constant shift per sub-stream unpacks a word tile without interleaving
registers back to channel order; the kernel permutes the query and the output instead.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["codebook_tile", "load_words", "select_levels", "stream_chan", "unpack", "values"]


@triton.jit
def select_levels(idx, cb_ptr, NLEV: tl.constexpr):
    """Scalar codewords of ``N <= 4`` levels by selects (cheaper than a gather at that size)."""
    c0 = tl.load(cb_ptr)
    c1 = tl.load(cb_ptr + 1)
    if NLEV == 2:
        y = tl.where(idx == 0, c0, c1)
    else:
        c2 = tl.load(cb_ptr + 2)
        c3 = tl.load(cb_ptr + 3)
        y = tl.where(idx < 2, tl.where(idx == 0, c0, c1), tl.where(idx == 2, c2, c3))
    return y


@triton.jit
def stream_chan(D: tl.constexpr, P: tl.constexpr, NW: tl.constexpr, VEC: tl.constexpr):
    """Channel held at each stream-major position: ``VEC·(P·w + r) + c``."""
    pos = tl.arange(0, D)
    r = pos // (NW * VEC)
    w = (pos // VEC) % NW
    c = pos % VEC
    return VEC * (P * w + r) + c


@triton.jit
def load_words(c_ptr, rows, tmask, RB: tl.constexpr, NW: tl.constexpr, WB: tl.constexpr):
    """``[BT, NW]`` words as loaded, each holding ``P`` whole indices: one element of the codes'
    dtype stays that dtype (uint8 bytes go 4 to a register while a prefetched tile waits); 3-byte
    words are assembled little-endian into int32."""
    w = tl.arange(0, NW)
    base = c_ptr + rows[:, None] * RB
    if WB == 1:
        words = tl.load(base + w[None, :], mask=tmask[:, None], other=0)
    else:
        b0 = tl.load(base + 3 * w[None, :], mask=tmask[:, None], other=0).to(tl.int32)
        b1 = tl.load(base + 3 * w[None, :] + 1, mask=tmask[:, None], other=0).to(tl.int32)
        b2 = tl.load(base + 3 * w[None, :] + 2, mask=tmask[:, None], other=0).to(tl.int32)
        words = b0 | (b1 << 8) | (b2 << 16)
    return words


@triton.jit
def unpack(words, BITS: tl.constexpr, P: tl.constexpr, NW: tl.constexpr, BT: tl.constexpr):
    """Indices of a ``[BT, NW]`` word tile, stream-major (position ``r·NW + w`` = index ``P·w + r``)."""
    shifts = tl.arange(0, P) * BITS
    idx = (words.to(tl.int32)[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [BT, P, NW]
    return tl.reshape(idx, (BT, P * NW))


@triton.jit
def values(
    idx,
    rows,
    tmask,
    bh,
    t0,
    L,
    s_ptr,
    m_ptr,
    cb_ptr,
    chan,
    TG,
    KIND: tl.constexpr,
    VEC: tl.constexpr,
    NLEV: tl.constexpr,
    SEL: tl.constexpr,
    GE: tl.constexpr,
    GROUP: tl.constexpr,
    NG: tl.constexpr,
    ZERO: tl.constexpr,
    HAS_MIN: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
    P: tl.constexpr,
    NW: tl.constexpr,
    cbt,
    GATHER: tl.constexpr,
):
    """Values of a tile of indices, fp16 ``[BT, D]`` in stream-major order (VQ: rotated, unit norm).

    ``GATHER``: codewords come from ``cbt``, the codebook held in registers (``[N, D]`` levels
    broadcast over channels for ``VEC == 1``, ``[N, VEC]`` otherwise), by ``tl.gather``, which
    stages it in shared memory: one bank access per element instead of an L1 request that touches
    as many 128-byte lines as the warp's indices do."""
    if KIND == 2:
        if GATHER:
            if VEC == 1:
                y = tl.gather(cbt, idx, 0)
            else:
                R: tl.constexpr = D // VEC
                full = tl.broadcast_to(idx[:, :, None], (BT, R, VEC))
                y = tl.gather(cbt, tl.reshape(full, (BT * R, VEC)), 0)
                y = tl.reshape(y, (BT, D))
        elif SEL:  # N <= 4 scalar levels: selects beat a gather
            y = select_levels(idx, cb_ptr, NLEV)
        elif VEC == 1:
            y = tl.load(cb_ptr + idx)  # [BT, D] gather from an L1-resident codebook
        else:
            y = tl.load(cb_ptr + idx[:, :, None] * VEC + tl.arange(0, VEC)[None, None, :])  # [BT, R, VEC]
            y = tl.reshape(y, (BT, D))
        return y.to(tl.float16)
    elif KIND == 0:  # per-token scale per group of channels; group of position (r, w) is w // (GROUP/P)
        x = tl.reshape(idx.to(tl.float32) - ZERO, (BT, P, NG, GROUP // P))
        g = tl.arange(0, NG)
        s = tl.load(s_ptr + rows[:, None] * NG + g[None, :], mask=tmask[:, None], other=0.0)  # [BT, NG]
        x = x * s.to(tl.float32)[:, None, :, None]
        if HAS_MIN:
            mn = tl.load(m_ptr + rows[:, None] * NG + g[None, :], mask=tmask[:, None], other=0.0)
            x = x + mn.to(tl.float32)[:, None, :, None]
        return tl.reshape(x, (BT, D)).to(tl.float16)
    else:  # per-channel scale/min, one row per group of GROUP tokens (GE = min(GROUP, BT) rows share it)
        gi = (t0 + tl.arange(0, BT // GE) * GE) // GROUP  # [NGB] groups in this block
        gmask = gi * GROUP < L
        srow = (bh * TG + gi).to(tl.int64)
        s = tl.load(s_ptr + srow[:, None] * D + chan[None, :], mask=gmask[:, None], other=0.0)  # [NGB, D]
        x = tl.reshape(idx.to(tl.float32), (BT // GE, GE, D)) * s.to(tl.float32)[:, None, :]
        if HAS_MIN:
            mn = tl.load(m_ptr + srow[:, None] * D + chan[None, :], mask=gmask[:, None], other=0.0)
            x = x + mn.to(tl.float32)[:, None, :]
        return tl.reshape(x, (BT, D)).to(tl.float16)


@triton.jit
def codebook_tile(
    cb_ptr, KIND: tl.constexpr, N: tl.constexpr, VEC: tl.constexpr, D: tl.constexpr, GATHER: tl.constexpr
):
    """The codebook as a register tile for ``tl.gather`` (a 1-element dummy when unused)."""
    if GATHER and KIND == 2:
        n = tl.arange(0, N)
        if VEC == 1:
            cbt = tl.load(cb_ptr + n[:, None] + 0 * tl.arange(0, D)[None, :]).to(tl.float16)
        else:
            cbt = tl.load(cb_ptr + n[:, None] * VEC + tl.arange(0, VEC)[None, :]).to(tl.float16)
    else:
        cbt = tl.zeros([1, 1], tl.float16)
    return cbt
