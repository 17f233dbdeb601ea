"""Split-K decode attention for scalar-index layouts, one ``tl.dot`` per sub-stream (the fast path).

The general kernel (``kernel.py``) unpacks a whole ``[BT, d]`` tile in stream-major order with
per-element shift amounts; on an H100 that made it instruction-bound (~40 instructions per token
per warp, 255 registers, one program per SM). Here each of the ``P`` indices that share a word is
its own *sub-stream* ``r`` (channels ``P·w + r``): a constant shift and mask give a ``[BT, NW]``
tile, and scores are ``Σ_r q_r · y_rᵀ``, values ``acc_r += p · y_r`` with ``P`` accumulators.
Scales are folded out of the per-element path wherever the layout allows:

- int4/int8 with one scale per token: ``score = s_t (q·c − Z Σq)``, ``acc += (p s_t)·c − Z Σ p s_t``;
- KIVI keys (one scale/min row per group of ``BT`` tokens): ``q̃ = q ⊙ s_g``, bias ``q·m_g``;
- TurboQuant: ``score = norm_t (q'·ŷ)``, ``acc += (p norm_t)·ŷ`` (ŷ gathered, selected, or looked
  up by byte permutes, ``magic.lut_asm``).

Layouts whose scale changes along the channels (int4/int8 with groups, KIVI values) dequantize per
element in fp16, the scales broadcast from one load per group (``_group_tile``). On CUDA, integer
codes become fp16 by the PTX of ``magic.unpack_asm`` where that measured faster (``MAGIC``).
Requires ``vec == 1``, the same bits for keys and values, and ``d/P >= 16`` (``tl.dot``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import load_words, select_levels


@triton.jit
def _sub(
    words,
    r: tl.constexpr,
    BITS: tl.constexpr,
    KIND: tl.constexpr,
    NLEV: tl.constexpr,
    SEL: tl.constexpr,
    FOLD: tl.constexpr,
    cb_ptr,
    s_bc,
    m_bc,
    HAS_MIN: tl.constexpr,
    MAGIC: tl.constexpr = (),
):
    """Sub-stream ``r`` of a word tile (as loaded) as an fp16 ``[BT, NW]`` operand.

    ``MAGIC`` (CUDA only: one PTX string per sub-stream, ``magic.py``, whose constraints and pack
    per word width are the ones spelled here): integer codes become fp16 two per three
    instructions instead of a shift, mask and convert each. For byte words the asm is marked
    impure: Triton then cannot move the layout conversion to the tensor-core operand before it,
    onto the bytes (one ``LDS.U8`` per code), and moves the fp16 result instead (vector stores
    and ``ldmatrix``): 37 -> 30 warp-instructions per token for int4 in the SASS. A
    16-level codebook (``KIND == 2``) arrives as the tuple of ``_lut``."""
    if KIND != 2 and len(MAGIC) > 0:
        if words.dtype.primitive_bitwidth == 8:
            y = tl.inline_asm_elementwise(
                MAGIC[r], "=r,=r,r", [words], dtype=tl.float16, is_pure=False, pack=4
            )
        elif words.dtype.primitive_bitwidth == 16:
            y = tl.inline_asm_elementwise(MAGIC[r], "=r,r", [words], dtype=tl.float16, is_pure=True, pack=2)
        else:
            y = tl.inline_asm_elementwise(MAGIC[r], "=r,r,r", [words], dtype=tl.float16, is_pure=True, pack=2)
        if not FOLD:
            y = y * s_bc
            if HAS_MIN:
                y = y + m_bc
    elif KIND == 2 and len(MAGIC) > 0:
        y = words[r]  # the caller's _lut tuple
    else:
        idx = (words.to(tl.int32) >> (r * BITS)) & ((1 << BITS) - 1)
        if KIND == 2:
            if SEL:
                y = select_levels(idx, cb_ptr, NLEV).to(tl.float16)
            else:
                y = tl.load(cb_ptr + idx).to(tl.float16)
        else:
            y = idx.to(tl.float16)  # exact: codes < 256
            if not FOLD:
                y = y * s_bc
                if HAS_MIN:
                    y = y + m_bc
    return y


@triton.jit
def _group_tile(ptr, rows, tmask, NG: tl.constexpr, NW: tl.constexpr, BT: tl.constexpr):
    """A per-token, per-group fp16 tensor (``[rows, NG]``) as the ``[BT, NW]`` tile of its words.

    Word ``w`` (channels ``P·w + r``) lies in group ``w // (NW/NG)``: one load per group and a
    broadcast, instead of a load per word (which cost ~80 loads per thread and block)."""
    g = tl.load(ptr + rows[:, None] * NG + tl.arange(0, NG)[None, :], mask=tmask[:, None], other=0.0)
    return tl.reshape(tl.broadcast_to(g.to(tl.float16)[:, :, None], (BT, NG, NW // NG)), (BT, NW))


@triton.jit
def _table_words(cb_ptr, N: tl.constexpr):
    """``magic.table_words`` of the fp16 codebook at ``cb_ptr``, as kernel values (held in
    registers across the loop, where immediates were rematerialized before every ``prmt``)."""
    i = tl.arange(0, N)
    c = tl.load(cb_ptr + i).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    lo = (c & 0xFF) << (8 * (i % 4))  # bit-disjoint fields: their sum is their OR
    hi = (c >> 8) << (8 * (i % 4))
    if N == 16:
        tabs = (
            tl.sum(tl.where(i // 4 == 0, lo, 0)),
            tl.sum(tl.where(i // 4 == 2, lo, 0)),
            tl.sum(tl.where(i // 4 == 0, hi, 0)),
            tl.sum(tl.where(i // 4 == 2, hi, 0)),
        )
    else:
        tabs = (tl.sum(lo), tl.sum(hi))
    return tabs


@triton.jit
def _lut(words, MAGIC: tl.constexpr, BITS: tl.constexpr, tabs):
    """All sub-streams of a word tile as a tuple of fp16 codeword tiles, by the byte-permute table
    lookup of ``magic.lut_asm``; ``_sub`` then picks one.

    Byte words (values) go through an asm marked impure, as in ``_sub``: that keeps the lookup in
    the layout the bytes were loaded in, so the fp16 result (not the bytes, one ``LDS.U8`` each)
    is what moves to the tensor-core operand."""
    P: tl.constexpr = words.dtype.primitive_bitwidth // BITS
    PACK: tl.constexpr = 4 if words.dtype.primitive_bitwidth == 8 else 2
    PURE: tl.constexpr = words.dtype.primitive_bitwidth != 8
    argv = (words,) + tabs  # noqa: RUF005 (no starred unpacking in Triton); tables follow the words
    if P == 2:
        ys = tl.inline_asm_elementwise(
            MAGIC[0], MAGIC[1], argv, dtype=(tl.float16, tl.float16), is_pure=PURE, pack=PACK
        )
    elif P == 4:
        ys = tl.inline_asm_elementwise(
            MAGIC[0],
            MAGIC[1],
            argv,
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
            is_pure=PURE,
            pack=PACK,
        )
    else:
        ys = tl.inline_asm_elementwise(
            MAGIC[0],
            MAGIC[1],
            argv,
            dtype=(
                tl.float16,
                tl.float16,
                tl.float16,
                tl.float16,
                tl.float16,
                tl.float16,
                tl.float16,
                tl.float16,
            ),
            is_pure=PURE,
            pack=PACK,
        )
    return ys


@triton.jit
def _qsub(
    q_ptr,
    rot_ptr,
    qrow,
    gmask,
    r: tl.constexpr,
    ROT: tl.constexpr,
    D: tl.constexpr,
    P: tl.constexpr,
    NW: tl.constexpr,
):
    """Query channels ``P·w + r`` (rotated by Π when ``ROT``), fp32 ``[BG, NW]``."""
    w = tl.arange(0, NW)
    if ROT:
        d = tl.arange(0, D)
        qn = tl.load(q_ptr + qrow[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0)
        rows = tl.load(rot_ptr + (P * w + r)[None, :] * D + d[:, None])  # [D, NW] = Π[P·w+r, j]
        return tl.dot(qn.to(tl.float16), rows)
    return tl.load(q_ptr + qrow[:, None] * D + (P * w + r)[None, :], mask=gmask[:, None], other=0.0).to(
        tl.float32
    )


@triton.jit
def _kscale(
    q, ks_ptr, km_ptr, srow, gok, r: tl.constexpr, D: tl.constexpr, P: tl.constexpr, NW: tl.constexpr
):
    """KIVI keys: fold the block's per-channel scale into ``q_r``; return (q̃_r fp16, q_r·m_r)."""
    w = tl.arange(0, NW)
    s = tl.load(ks_ptr + srow * D + P * w + r, mask=gok, other=0.0).to(tl.float32)
    m = tl.load(km_ptr + srow * D + P * w + r, mask=gok, other=0.0).to(tl.float32)
    return (q * s[None, :]).to(tl.float16), tl.sum(q * m[None, :], 1)


@triton.jit
def _store_sub(o_ptr, part, gmask, acc, r: tl.constexpr, D: tl.constexpr, P: tl.constexpr, NW: tl.constexpr):
    w = tl.arange(0, NW)
    tl.store(o_ptr + part[:, None] * D + (P * w + r)[None, :], acc, mask=gmask[:, None])


@triton.jit
def _window_partial(
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
    D: tl.constexpr,
    BG: tl.constexpr,
    BT: tl.constexpr,
):
    """The fp16 recent window: natural channel order, unrotated query, its own partial slot."""
    d = tl.arange(0, D)
    WL = tl.load(wlen_ptr + b)
    if WL > 0:
        qn = tl.load(q_ptr + qrow[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0).to(tl.float16)
        m_i = tl.full([BG], float("-inf"), tl.float32)
        l_i = tl.zeros([BG], tl.float32)
        acc = tl.zeros([BG, D], tl.float32)
        for t0 in range(0, WL, BT):
            offs = t0 + tl.arange(0, BT)
            tmask = offs < WL
            rows = bh.to(tl.int64) * W + offs
            kw = tl.load(wk_ptr + rows[:, None] * D + d[None, :], mask=tmask[:, None], other=0.0)
            s = tl.dot(qn, tl.trans(kw.to(tl.float16)))
            s = tl.where(tmask[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vw = tl.load(wv_ptr + rows[:, None] * D + d[None, :], mask=tmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), vw.to(tl.float16))
            m_i = m_new
        tl.store(o_ptr + part[:, None] * D + d[None, :], acc / l_i[:, None], mask=gmask[:, None])
        tl.store(lse_ptr + part, m_i + tl.log2(l_i), mask=gmask)


@triton.jit
def _split_sub_kernel(
    q_ptr,
    kc_ptr,
    ks_ptr,
    km_ptr,
    vc_ptr,
    vs_ptr,
    vm_ptr,
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
    TGK,
    TGV,
    W,
    NS,
    SPLIT,
    G: tl.constexpr,
    BG: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
    HAS_WIN: tl.constexpr,
    BITS: tl.constexpr,
    PK: tl.constexpr,
    NWK: tl.constexpr,
    WBK: tl.constexpr,
    RBK: tl.constexpr,
    PV: tl.constexpr,
    NWV: tl.constexpr,
    WBV: tl.constexpr,
    RBV: tl.constexpr,
    K_KIND: tl.constexpr,
    K_NLEV: tl.constexpr,
    K_SEL: tl.constexpr,
    K_FOLD: tl.constexpr,
    K_ZERO: tl.constexpr,
    K_GROUP: tl.constexpr,
    K_NG: tl.constexpr,
    K_MIN: tl.constexpr,
    V_KIND: tl.constexpr,
    V_NLEV: tl.constexpr,
    V_SEL: tl.constexpr,
    V_FOLD: tl.constexpr,
    V_ZERO: tl.constexpr,
    V_GROUP: tl.constexpr,
    V_NG: tl.constexpr,
    V_MIN: tl.constexpr,
    K_MAGIC: tl.constexpr = (),
    V_MAGIC: tl.constexpr = (),
):
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
            ROT: tl.constexpr = K_KIND == 2
            # one tile per sub-stream: queries (fp32 for KIVI's scale folding, fp16 for the dots),
            # value accumulators; tuples unrolled at compile time (Triton builds them by
            # concatenation: it has no starred unpacking)
            qs = ()
            hs = ()
            qsum = tl.zeros([BG], tl.float32)
            for r in tl.static_range(PK):
                qs = qs + (_qsub(q_ptr, rot_ptr, qrow, gmask, r, ROT, D, PK, NWK),)  # noqa: RUF005
                hs = hs + (qs[r].to(tl.float16),)  # noqa: RUF005
                qsum += tl.sum(hs[r].to(tl.float32), 1)
            accs = ()
            for _r in tl.static_range(PV):
                accs = accs + (tl.zeros([BG, NWV], tl.float32),)  # noqa: RUF005
            m_i = tl.full([BG], float("-inf"), tl.float32)
            l_i = tl.zeros([BG], tl.float32)
            lz = tl.zeros([BG], tl.float32)  # Σ p·scale (folded value zero-point)
            if K_KIND == 2 and len(K_MAGIC) > 0:
                ktabs = _table_words(cbk_ptr, K_NLEV)
            if V_KIND == 2 and len(V_MAGIC) > 0:
                vtabs = _table_words(cbv_ptr, V_NLEV)
            # add the per-element min tile: KIVI's min, or -zero·scale unless the PTX took the zero
            K_ADDM: tl.constexpr = K_MIN or len(K_MAGIC) == 0
            V_ADDM: tl.constexpr = V_MIN or len(V_MAGIC) == 0
            for t0 in range(start, end, BT):
                offs = t0 + tl.arange(0, BT)
                tmask = offs < end
                rows = bh.to(tl.int64) * T + offs
                wk = load_words(kc_ptr, rows, tmask, RBK, NWK, WBK)
                if K_KIND == 2 and len(K_MAGIC) > 0:
                    wk = _lut(wk, K_MAGIC, BITS, ktabs)
                if K_KIND == 0 and not K_FOLD:
                    sk = _group_tile(ks_ptr, rows, tmask, K_NG, NWK, BT)
                    mk = (sk.to(tl.float32) * -K_ZERO).to(tl.float16)  # symmetric: (c - Z)·s
                    if K_MIN:
                        mk = _group_tile(km_ptr, rows, tmask, K_NG, NWK, BT)
                else:
                    sk = tl.zeros([BT, NWK], tl.float16)
                    mk = sk
                if K_KIND == 1:  # one KIVI key group per block (BT <= GROUP)
                    srow = bh.to(tl.int64) * TGK + t0 // K_GROUP
                    gok = (t0 // K_GROUP) * K_GROUP < L
                    bias = tl.zeros([BG], tl.float32)
                    for r in tl.static_range(PK):
                        kr, cr = _kscale(qs[r], ks_ptr, km_ptr, srow, gok, r, D, PK, NWK)
                        bias += cr
                        y = _sub(wk, r, BITS, K_KIND, K_NLEV, K_SEL, True, cbk_ptr, sk, mk, K_MIN, K_MAGIC)
                        if r == 0:
                            s = tl.dot(kr, tl.trans(y))
                        else:
                            s += tl.dot(kr, tl.trans(y))
                    s = s + bias[:, None]
                else:
                    for r in tl.static_range(PK):
                        y = _sub(wk, r, BITS, K_KIND, K_NLEV, K_SEL, K_FOLD, cbk_ptr, sk, mk, K_ADDM, K_MAGIC)
                        if r == 0:
                            s = tl.dot(hs[r], tl.trans(y))
                        else:
                            s += tl.dot(hs[r], tl.trans(y))
                if K_KIND == 2:
                    s = s * tl.load(ks_ptr + rows, mask=tmask, other=0.0).to(tl.float32)[None, :]
                if K_FOLD:
                    s = (s - K_ZERO * qsum[:, None]) * tl.load(ks_ptr + rows, mask=tmask, other=0.0).to(
                        tl.float32
                    )[None, :]
                s = tl.where(tmask[None, :], s * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                wv = load_words(vc_ptr, rows, tmask, RBV, NWV, WBV)
                if V_KIND == 2 and len(V_MAGIC) > 0:
                    wv = _lut(wv, V_MAGIC, BITS, vtabs)
                if V_KIND == 0 and not V_FOLD:
                    sv = _group_tile(vs_ptr, rows, tmask, V_NG, NWV, BT)
                    mv = (sv.to(tl.float32) * -V_ZERO).to(tl.float16)  # symmetric: (c - Z)·s
                    if V_MIN:
                        mv = _group_tile(vm_ptr, rows, tmask, V_NG, NWV, BT)
                else:
                    sv = tl.zeros([BT, NWV], tl.float16)
                    mv = sv
                if V_KIND == 2 or V_FOLD:  # fold norm / per-token scale into the weights
                    p = p * tl.load(vs_ptr + rows, mask=tmask, other=0.0).to(tl.float32)[None, :]
                    lz = lz * alpha + tl.sum(p, 1)
                pv = p.to(tl.float16)
                new = ()
                for r in tl.static_range(PV):
                    y = _sub(wv, r, BITS, V_KIND, V_NLEV, V_SEL, V_FOLD, cbv_ptr, sv, mv, V_ADDM, V_MAGIC)
                    new = new + (accs[r] * alpha[:, None] + tl.dot(pv, y),)  # noqa: RUF005
                accs = new
                m_i = m_new
            inv = 1.0 / l_i
            zc = V_ZERO * lz if V_FOLD else tl.zeros([BG], tl.float32)
            for r in tl.static_range(PV):
                _store_sub(o_ptr, part, gmask, (accs[r] - zc[:, None]) * inv[:, None], r, D, PV, NWV)
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
