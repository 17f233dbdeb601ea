"""Split-K decode attention for vector codebooks (FibQuant, ``vec >= 2``): one codeword per load.

The general kernel (``kernel.py``) already loads a FibQuant codeword as one 8-byte vector, but
Triton's pipeliner turns those gathers into cp.async copies through shared memory and the
``[BT, d]`` tile is rebuilt in stream-major order: ~1 ms at B=8, L=32k on an H100 (SDPA: 0.37 ms).
Here the codebook is viewed as int32/int64 words on the host (one word per codeword, two for
``vec = 8``), copied once into shared memory and gathered by ``tl.gather`` (or from L1), then
split into its ``vec`` fp16 halves (a ``mov.b64 {h0, h1, h2, h3}`` in PTX on CUDA, which the
SASS shows cheaper than shifts: 24.6 vs 28.9 warp-instructions per token at b=2, k=4; shifts in
the interpreter).

Nothing is interleaved back to channel order: like ``kernel_sub.py``, each (index position ``r``
in a byte, coordinate ``c``) is a *sub-stream* tile ``[BT, NW]`` holding channel
``vec·(P·w + r) + c`` of byte ``w``, scores are ``Σ_{r,c} q'_{rc} · y_{rc}ᵀ`` (``q' = Π q`` read
in that order) and values accumulate ``acc_{rc} += (p·norm) · y_{rc}``, stored through the same
map; the reduce kernel applies ``Πᵀ`` once. Codes are read one byte per word (``P = 8 / bits``
indices), so ``NW`` is the row's byte count and must be >= 16 for ``tl.dot``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernel_sub import _window_partial
from .tiles import load_words


@triton.jit
def _halves(w, N: tl.constexpr, ASM: tl.constexpr):
    """The ``N`` (2 or 4) fp16 halves of 32/64-bit codeword words, lowest first."""
    if N == 2:
        if ASM:
            h = tl.inline_asm_elementwise(
                "mov.b32 {$0, $1}, $2;", "=h,=h,r", [w], dtype=(tl.int16, tl.int16), is_pure=True, pack=1
            )
        else:
            h = ((w & 0xFFFF).to(tl.int16), ((w >> 16) & 0xFFFF).to(tl.int16))
    else:
        if ASM:
            h = tl.inline_asm_elementwise(
                "mov.b64 {$0, $1, $2, $3}, $4;",
                "=h,=h,=h,=h,l",
                [w],
                dtype=(tl.int16, tl.int16, tl.int16, tl.int16),
                is_pure=True,
                pack=1,
            )
        else:
            h = (
                (w & 0xFFFF).to(tl.int16),
                ((w >> 16) & 0xFFFF).to(tl.int16),
                ((w >> 32) & 0xFFFF).to(tl.int16),
                ((w >> 48) & 0xFFFF).to(tl.int16),
            )
    ys = ()
    for i in tl.static_range(N):
        ys = ys + (h[i].to(tl.float16, bitcast=True),)  # noqa: RUF005
    return ys


@triton.jit
def _book(cb_ptr, N: tl.constexpr, VEC: tl.constexpr, GATHER: tl.constexpr):
    """The codebook's words as register tiles for ``tl.gather`` (``[N]`` each: one word per
    codeword, two for ``VEC = 8``); a dummy when codewords come from L1 instead."""
    if GATHER:
        n = tl.arange(0, N)
        if VEC == 8:
            book = (tl.load(cb_ptr + 2 * n), tl.load(cb_ptr + 2 * n + 1))
        else:
            book = (tl.load(cb_ptr + n),)
    else:
        book = (tl.zeros([1], tl.int32),)
    return book


@triton.jit
def _word(idx, cb_ptr, book, i: tl.constexpr, NWORD: tl.constexpr, GATHER: tl.constexpr):
    """Word ``i`` of codewords ``idx``: from L1 (a 32/64-bit load each), or by ``tl.gather`` from
    the shared-memory copy of the codebook."""
    if GATHER:
        flat = tl.reshape(idx, (idx.shape[0] * idx.shape[1],))
        w = tl.reshape(tl.gather(book[i], flat, 0), (idx.shape[0], idx.shape[1]))
    else:
        w = tl.load(cb_ptr + NWORD * idx + i)
    return w


@triton.jit
def _codewords(idx, cb_ptr, book, VEC: tl.constexpr, ASM: tl.constexpr, GATHER: tl.constexpr):
    """The ``VEC`` coordinate tiles (fp16, shaped like ``idx``) of codewords ``idx``.

    ``cb_ptr``: the fp16 codebook viewed as int32 (``VEC = 2``) or int64 words (``VEC >= 4``)."""
    if VEC == 2:
        ys = _halves(_word(idx, cb_ptr, book, 0, 1, GATHER), 2, ASM)
    elif VEC == 4:
        ys = _halves(_word(idx, cb_ptr, book, 0, 1, GATHER), 4, ASM)
    else:
        lo = _halves(_word(idx, cb_ptr, book, 0, 2, GATHER), 4, ASM)
        hi = _halves(_word(idx, cb_ptr, book, 1, 2, GATHER), 4, ASM)
        ys = lo + hi
    return ys


@triton.jit
def _chan(r: tl.constexpr, c: tl.constexpr, VEC: tl.constexpr, P: tl.constexpr, NW: tl.constexpr):
    """Channel of each position of sub-stream (r, c): coordinate ``c`` of index ``P·w + r``."""
    return VEC * (P * tl.arange(0, NW) + r) + c


@triton.jit
def _split_vq_kernel(
    q_ptr,
    kc_ptr,
    kn_ptr,
    vc_ptr,
    vn_ptr,
    rot_ptr,
    cbk_ptr,
    cbv_ptr,
    len_ptr,
    wk_ptr,
    wv_ptr,
    wlen_ptr,
    o_ptr,
    lse_ptr,
    qk_scale,
    Hkv,
    T,
    W,
    NS,
    SPLIT,
    G: tl.constexpr,
    BG: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
    HAS_WIN: tl.constexpr,
    BK: tl.constexpr,
    VK: tl.constexpr,
    BV: tl.constexpr,
    VV: tl.constexpr,
    ASM: tl.constexpr,
    GATHER: tl.constexpr,
):
    PK: tl.constexpr = 8 // BK  # indices per byte
    NWK: tl.constexpr = D // (VK * PK)  # bytes per key row
    PV: tl.constexpr = 8 // BV
    NWV: tl.constexpr = D // (VV * PV)
    sid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    g = tl.arange(0, BG)
    gmask = g < G
    qrow = (bh * G + g).to(tl.int64)
    part = qrow * (NS + HAS_WIN) + sid
    if sid < NS:
        L = tl.load(len_ptr + b)
        start = sid * SPLIT
        if start < L:
            end = tl.minimum(start + SPLIT, L)
            # q' = Π q once, one fp16 [BG, NWK] tile per key sub-stream (r, c)
            d = tl.arange(0, D)
            qn = tl.load(q_ptr + qrow[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0)
            qn = qn.to(tl.float16)
            qs = ()
            for r in tl.static_range(PK):
                for c in tl.static_range(VK):
                    ch = _chan(r, c, VK, PK, NWK)
                    pik = tl.load(rot_ptr + ch[None, :] * D + d[:, None])  # [D, NWK] = Π[ch, j]
                    qs = qs + (tl.dot(qn, pik).to(tl.float16),)  # noqa: RUF005
            accs = ()
            for _i in tl.static_range(PV * VV):
                accs = accs + (tl.zeros([BG, NWV], tl.float32),)  # noqa: RUF005
            m_i = tl.full([BG], float("-inf"), tl.float32)
            l_i = tl.zeros([BG], tl.float32)
            kbook = _book(cbk_ptr, 1 << BK, VK, GATHER)
            vbook = _book(cbv_ptr, 1 << BV, VV, GATHER)
            for t0 in range(start, end, BT):
                offs = t0 + tl.arange(0, BT)
                tmask = offs < end
                rows = bh.to(tl.int64) * T + offs
                wk = load_words(kc_ptr, rows, tmask, NWK, NWK, 1).to(tl.int32)
                for r in tl.static_range(PK):
                    idx = (wk >> (r * BK)) & ((1 << BK) - 1)
                    ys = _codewords(idx, cbk_ptr, kbook, VK, ASM, GATHER)
                    for c in tl.static_range(VK):
                        if r == 0 and c == 0:
                            s = tl.dot(qs[0], tl.trans(ys[0]))
                        else:
                            s += tl.dot(qs[r * VK + c], tl.trans(ys[c]))
                s = s * tl.load(kn_ptr + rows, mask=tmask, other=0.0).to(tl.float32)[None, :]
                s = tl.where(tmask[None, :], s * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                pv = (p * tl.load(vn_ptr + rows, mask=tmask, other=0.0).to(tl.float32)[None, :]).to(
                    tl.float16
                )
                wv = load_words(vc_ptr, rows, tmask, NWV, NWV, 1).to(tl.int32)
                new = ()
                for r in tl.static_range(PV):
                    idx = (wv >> (r * BV)) & ((1 << BV) - 1)
                    ys = _codewords(idx, cbv_ptr, vbook, VV, ASM, GATHER)
                    for c in tl.static_range(VV):
                        new = new + (accs[r * VV + c] * alpha[:, None] + tl.dot(pv, ys[c]),)  # noqa: RUF005
                accs = new
                m_i = m_new
            inv = 1.0 / l_i
            for r in tl.static_range(PV):
                for c in tl.static_range(VV):
                    ch = _chan(r, c, VV, PV, NWV)
                    tl.store(
                        o_ptr + part[:, None] * D + ch[None, :],
                        accs[r * VV + c] * inv[:, None],
                        mask=gmask[:, None],
                    )
            tl.store(lse_ptr + part, m_i + tl.log2(l_i), mask=gmask)
    else:
        if HAS_WIN:
            _window_partial(
                q_ptr,
                wk_ptr,
                wv_ptr,
                wlen_ptr,
                o_ptr,
                lse_ptr,
                qk_scale,
                W,
                b,
                bh,
                qrow,
                gmask,
                part,
                D,
                BG,
                BT,
            )
