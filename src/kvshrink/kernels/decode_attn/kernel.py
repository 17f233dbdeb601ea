"""Triton flash-decoding over packed caches: split-K partials, then a reduce.

Design (one query token per sequence, GQA):

- Grid ``(splits + window, B·Hkv)``. A program owns one KV head and its ``G`` query heads (padded to
  ``BG >= 16`` rows for ``tl.dot``) and ``SPLIT`` consecutive packed tokens; one extra program per
  head attends to the fp16 recent window. Each writes a normalized partial output and its
  log-sum-exp; ``_reduce_kernel`` merges them (online softmax across splits).
- Codes are read as words (see ``layout.py``) and unpacked in registers into a ``[BT, d]`` tile in
  *stream-major* order: position ``(r, w, c)`` holds coordinate ``c`` of index ``P·w + r``. Rather
  than interleave registers back to channel order, the query is loaded (or rotated) directly into
  that permuted order and the partial output is scattered back through the same permutation, so
  every product is one ``tl.dot`` over the full head dim.
- int4/int8/KIVI dequantize in registers (``code·scale (+ min)``); KIVI keys share one scale row per
  group of tokens, broadcast over a ``[groups, group, d]`` view.
- TurboQuant/FibQuant never leave the rotated basis: ``q' = Π q`` once per program (fp16 ``tl.dot``
  against the permuted rows of Π), codewords gathered from an fp16 codebook (or selected for
  ``N <= 4`` scalar levels), ``score = norm · ⟨q', ŷ⟩``, and values accumulate ``p·norm·ŷ``.
  ``_reduce_kernel`` applies ``Πᵀ`` once per query head, after merging splits and before adding the
  (unrotated) window partial.

Tile helpers (load, unpack, dequantize or gather codewords) live in ``tiles.py``; which kernel
and knobs a layout gets, and its constexprs, in ``choose.py``.

Costs (per token and KV head, d=128): int4 66 B, KIVI-2 ~96 B, TurboQuant-4 132 B, FibQuant b=2 68 B
of reads, against 512 B for fp16; the kernel is meant to be bound by those bytes.
"""

from __future__ import annotations

import math
import weakref

import torch
import triton
import triton.language as tl

from ...codecs.base import Codec, Packed
from ..layout import CodeLayout, layout_of, packed_unsupported, rotation_matrix
from .choose import (
    DEFAULTS,
    DecodeConfig,
    as_words,
    gather_measured_faster,
    gather_ok,
    magic_args,
    magic_measured_faster,
    prefetch_measured_faster,
    role_args,
    sub_args,
    sub_measured_faster,
    sub_ok,
    sub_word,
    vq_measured_faster,
    vq_ok,
    word_args,
)
from .kernel_sub import _split_sub_kernel, _window_partial
from .kernel_vq import _split_vq_kernel
from .reference import Window
from .tiles import codebook_tile, load_words, stream_chan, unpack, values

__all__ = ["DecodeConfig", "decode_attention_triton"]


@triton.jit
def _split_kernel(
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
    K_KIND: tl.constexpr,
    K_BITS: tl.constexpr,
    K_VEC: tl.constexpr,
    K_NLEV: tl.constexpr,
    K_SEL: tl.constexpr,
    K_P: tl.constexpr,
    K_NW: tl.constexpr,
    K_WB: tl.constexpr,
    K_RB: tl.constexpr,
    K_GROUP: tl.constexpr,
    K_GE: tl.constexpr,
    K_NG: tl.constexpr,
    K_ZERO: tl.constexpr,
    K_MIN: tl.constexpr,
    V_KIND: tl.constexpr,
    V_BITS: tl.constexpr,
    V_VEC: tl.constexpr,
    V_NLEV: tl.constexpr,
    V_SEL: tl.constexpr,
    V_P: tl.constexpr,
    V_NW: tl.constexpr,
    V_WB: tl.constexpr,
    V_RB: tl.constexpr,
    V_GROUP: tl.constexpr,
    V_GE: tl.constexpr,
    V_NG: tl.constexpr,
    V_ZERO: tl.constexpr,
    V_MIN: tl.constexpr,
    PREFETCH: tl.constexpr,
    GATHER: tl.constexpr,
):
    sid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    g = tl.arange(0, BG)
    gmask = g < G
    d = tl.arange(0, D)
    qrow = (bh * G + g).to(tl.int64)  # [BG] query heads of this KV head
    part = qrow * (NS + HAS_WIN) + sid  # [BG] partial slot
    if sid < NS:
        L = tl.load(len_ptr + b)
        start = sid * SPLIT
        if start < L:
            end = tl.minimum(start + SPLIT, L)
            chan_k = stream_chan(D, K_P, K_NW, K_VEC)
            chan_v = stream_chan(D, V_P, V_NW, V_VEC)
            if K_KIND == 2:  # q' = Π q, in the keys' stream-major order: M[j, pos] = Π[chan(pos), j]
                qn = tl.load(q_ptr + qrow[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0)
                rot = tl.load(rot_ptr + chan_k[None, :] * D + d[:, None])  # [D, D] fp16
                qk = tl.dot(qn.to(tl.float16), rot).to(tl.float16)  # [BG, D]
            else:
                qk = tl.load(q_ptr + qrow[:, None] * D + chan_k[None, :], mask=gmask[:, None], other=0.0)
                qk = qk.to(tl.float16)
            m_i = tl.full([BG], float("-inf"), tl.float32)
            l_i = tl.zeros([BG], tl.float32)
            acc = tl.zeros([BG, D], tl.float32)
            cbt_k = codebook_tile(cbk_ptr, K_KIND, K_NLEV, K_VEC, D, GATHER)
            cbt_v = codebook_tile(cbv_ptr, V_KIND, V_NLEV, V_VEC, D, GATHER)
            if PREFETCH:  # registers double-buffer the next block's codes and norms (latency)
                offs = start + tl.arange(0, BT)
                rows = bh.to(tl.int64) * T + offs
                wk_n = load_words(kc_ptr, rows, offs < end, K_RB, K_NW, K_WB)
                wv_n = load_words(vc_ptr, rows, offs < end, V_RB, V_NW, V_WB)
                if K_KIND == 2:
                    nk_n = tl.load(ks_ptr + rows, mask=offs < end, other=0.0)
                if V_KIND == 2:
                    nv_n = tl.load(vs_ptr + rows, mask=offs < end, other=0.0)
            for t0 in range(start, end, BT):
                offs = t0 + tl.arange(0, BT)
                tmask = offs < end
                rows = bh.to(tl.int64) * T + offs  # [BT] packed rows
                if PREFETCH:
                    wk = wk_n
                    wv = wv_n
                    nmask = (offs + BT) < end
                    wk_n = load_words(kc_ptr, rows + BT, nmask, K_RB, K_NW, K_WB)
                    wv_n = load_words(vc_ptr, rows + BT, nmask, V_RB, V_NW, V_WB)
                    if K_KIND == 2:
                        nk = nk_n.to(tl.float32)
                        nk_n = tl.load(ks_ptr + rows + BT, mask=nmask, other=0.0)
                    if V_KIND == 2:
                        nv = nv_n.to(tl.float32)
                        nv_n = tl.load(vs_ptr + rows + BT, mask=nmask, other=0.0)
                else:
                    wk = load_words(kc_ptr, rows, tmask, K_RB, K_NW, K_WB)
                    wv = load_words(vc_ptr, rows, tmask, V_RB, V_NW, V_WB)
                    if K_KIND == 2:
                        nk = tl.load(ks_ptr + rows, mask=tmask, other=0.0).to(tl.float32)
                    if V_KIND == 2:
                        nv = tl.load(vs_ptr + rows, mask=tmask, other=0.0).to(tl.float32)
                ik = unpack(wk, K_BITS, K_P, K_NW, BT)
                yk = values(
                    ik,
                    rows,
                    tmask,
                    bh,
                    t0,
                    L,
                    ks_ptr,
                    km_ptr,
                    cbk_ptr,
                    chan_k,
                    TGK,
                    K_KIND,
                    K_VEC,
                    K_NLEV,
                    K_SEL,
                    K_GE,
                    K_GROUP,
                    K_NG,
                    K_ZERO,
                    K_MIN,
                    D,
                    BT,
                    K_P,
                    K_NW,
                    cbt_k,
                    GATHER and K_KIND == 2,
                )
                s = tl.dot(qk, tl.trans(yk))  # [BG, BT]
                if K_KIND == 2:
                    s = s * nk[None, :]
                s = tl.where(tmask[None, :], s * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])  # [BG, BT]
                l_i = l_i * alpha + tl.sum(p, 1)
                iv = unpack(wv, V_BITS, V_P, V_NW, BT)
                yv = values(
                    iv,
                    rows,
                    tmask,
                    bh,
                    t0,
                    L,
                    vs_ptr,
                    vm_ptr,
                    cbv_ptr,
                    chan_v,
                    TGV,
                    V_KIND,
                    V_VEC,
                    V_NLEV,
                    V_SEL,
                    V_GE,
                    V_GROUP,
                    V_NG,
                    V_ZERO,
                    V_MIN,
                    D,
                    BT,
                    V_P,
                    V_NW,
                    cbt_v,
                    GATHER and V_KIND == 2,
                )
                if V_KIND == 2:  # fold the value norms into the weights: Σ p·norm·ŷ
                    p = p * nv[None, :]
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), yv)
                m_i = m_new
            o = acc / l_i[:, None]
            tl.store(o_ptr + part[:, None] * D + chan_v[None, :], o, mask=gmask[:, None])
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


@triton.jit
def _reduce_kernel(
    o_ptr,
    lse_ptr,
    len_ptr,
    wlen_ptr,
    rot_ptr,
    out_ptr,
    Hkv,
    NS,
    SPLIT,
    G: tl.constexpr,
    BG: tl.constexpr,
    D: tl.constexpr,
    CH: tl.constexpr,
    HAS_WIN: tl.constexpr,
    ROT_V: tl.constexpr,
    DC: tl.constexpr,
):
    """Merge one KV head's split partials (log2 domain), rotate back once, add the window.

    Program ``(bh, c)`` writes output channels ``c·DC .. c·DC + DC - 1``. With a rotation (vq
    values) it merges every channel and multiplies by the ``[D, DC]`` columns of Π it owns: a
    single program per head holding all of the fp32 ``[D, D]`` Π spilled it to local memory and
    took ~110 µs at B=8, L=32k on an H100 (ncu: TurboQuant b=2's split kernel 209 µs of 323)."""
    bh = tl.program_id(0)
    cb = tl.program_id(1)
    b = bh // Hkv
    g = tl.arange(0, BG)
    gmask = g < G
    cols = cb * DC + tl.arange(0, DC)
    if ROT_V:
        d = tl.arange(0, D)
    else:
        d = cols
    NSW = NS + HAS_WIN
    qrow = (bh * G + g).to(tl.int64)
    L = tl.load(len_ptr + b)
    nval = tl.cdiv(L, SPLIT)  # splits that hold tokens (the others wrote nothing)
    m = tl.full([BG], float("-inf"), tl.float32)
    l = tl.zeros([BG], tl.float32)  # noqa: E741
    acc = tl.zeros([BG, D if ROT_V else DC], tl.float32)
    for s0 in range(0, nval, CH):
        sidx = s0 + tl.arange(0, CH)
        ok = gmask[:, None] & (sidx < nval)[None, :]  # [BG, CH]
        slot = qrow[:, None] * NSW + sidx[None, :]
        lse = tl.load(lse_ptr + slot, mask=ok, other=float("-inf"))
        o = tl.load(o_ptr + slot[:, :, None] * D + d[None, None, :], mask=ok[:, :, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe[:, None])  # [BG, CH]
        l = l * alpha + tl.sum(w, 1)  # noqa: E741
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 1)
        m = m_new
    if ROT_V:  # x = Πᵀ y, as rows: x = y Π (this program's columns)
        rot = tl.load(rot_ptr + d[:, None] * D + cols[None, :])  # [D, DC] fp32
        acc = tl.dot(acc, rot, input_precision="ieee")
    if HAS_WIN:
        WL = tl.load(wlen_ptr + b)
        wok = gmask & (WL > 0)
        lw = tl.load(lse_ptr + qrow * NSW + NS, mask=wok, other=float("-inf"))
        ow = tl.load(o_ptr + (qrow * NSW + NS)[:, None] * D + cols[None, :], mask=wok[:, None], other=0.0)
        m_new = tl.maximum(m, lw)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lw - m_safe)
        l = l * alpha + w  # noqa: E741
        acc = acc * alpha[:, None] + w[:, None] * ow
    out = tl.where(l[:, None] > 0, acc / l[:, None], 0.0)
    tl.store(
        out_ptr + qrow[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=gmask[:, None]
    )


# -- host side ---------------------------------------------------------------------------------


_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vq_tensors(codec: Codec, d: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Rotation (fp16 for q, fp32 for the output), fp16 codebooks, their bit patterns and (for
    vector codebooks) their 32/64-bit word views, cached per codec and device."""
    per = _STATE.setdefault(codec, {})
    key = (d, str(device))
    if key not in per:
        rot = rotation_matrix(codec, d).to(device)
        books = {role: codec.codebook(d, role).half().contiguous() for role in ("key", "value")}  # type: ignore[attr-defined]
        on_device = {role: book.to(device) for role, book in books.items()}
        per[key] = {
            "rot16": rot.half().contiguous(),
            "rot32": rot.contiguous(),
            **on_device,
            **{
                f"{role}_words": _word_book(book)
                for role, book in on_device.items()
                if book.shape[-1] in (2, 4, 8)
            },
            # fp16 bit patterns for the PTX lookups, read on the host once (not during a capture)
            **{
                f"{role}_bits": tuple(int(x) & 0xFFFF for x in book.view(torch.int16).flatten().tolist())
                for role, book in books.items()
            },
        }
    return per[key]


def _word_book(book: torch.Tensor) -> torch.Tensor:
    """An fp16 ``[N, vec]`` codebook as one int32 (``vec = 2``) or ``vec/4`` int64 words per
    codeword, the unit ``kernel_vq`` gathers (same bytes, little-endian: coordinate ``c`` is bits
    ``16c..16c+15``)."""
    return book.contiguous().view(torch.int32 if book.shape[-1] == 2 else torch.int64).reshape(-1)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # interpreter: few programs keep CPU tests fast and still exercise splits
    return torch.cuda.get_device_properties(device).multi_processor_count


def _role_tensors(packed: Packed, lay: CodeLayout, vq: dict | None, role: str, dummy: torch.Tensor):
    tz = packed.tensors
    codes = tz["codes"].contiguous()
    if lay.kind == "vq":
        assert vq is not None
        return codes, tz["norm"].contiguous(), dummy, vq[role], 1
    mn = tz["min"].contiguous() if lay.has_min else dummy
    tg = tz["scale"].shape[-2] if lay.kind == "channel" else 1
    return codes, tz["scale"].contiguous(), mn, dummy, tg


def decode_attention_triton(
    q: torch.Tensor,
    keys: Packed,
    values: Packed,
    lengths: torch.Tensor,
    window: Window | None,
    codec: Codec,
    scale: float | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Launch split + reduce. Shapes as in :func:`kvshrink.kernels.decode_attn.decode_attention`."""
    cfg = {**DEFAULTS, **(config or {})}
    b, hq, d = q.shape
    codes_k = keys.tensors["codes"]
    hkv, t = codes_k.shape[1], codes_k.shape[2]
    g = hq // hkv
    lk, lv = layout_of(codec, "key", d), layout_of(codec, "value", d)
    for lay, packed in ((lk, keys), (lv, values)):
        why = packed_unsupported(packed, lay, d)
        if why:
            raise ValueError(f"{codec.spec}: no Triton kernel for this layout: {why}")
    bt = cfg["BT"]
    want_sub = sub_measured_faster(lk) if cfg["sub"] is None else cfg["sub"]
    sub = want_sub and sub_ok(lk, lv, d, q.is_cuda)
    use_vq = (vq_measured_faster(lk) if cfg["vq"] is None else bool(cfg["vq"])) and vq_ok(lk, lv, d)
    if lk.kind == "channel":
        bt = min(bt, lk.group) if sub else max(bt, 16)
    vq = _vq_tensors(codec, d, q.device) if "vq" in (lk.kind, lv.kind) else None
    dummy = q
    kc, ks, km, cbk, tgk = _role_tensors(keys, lk, vq, "key", dummy)
    vc, vs, vm, cbv, tgv = _role_tensors(values, lv, vq, "value", dummy)
    rot16 = vq["rot16"] if vq else dummy
    rot32 = vq["rot32"] if vq else dummy
    lengths = lengths.to(device=q.device, dtype=torch.int32).contiguous()
    has_win = window is not None
    if has_win:
        wk, wv = window.keys.contiguous(), window.values.contiguous()
        wlen = window.lengths.to(device=q.device, dtype=torch.int32).contiguous()
        w_cap = wk.shape[2]
    else:
        wk = wv = dummy
        wlen, w_cap = lengths, 0
    # tokens per split: enough programs to fill the GPU a few times over, whole blocks each
    target = cfg["programs"] or 4 * _sm_count(q.device)
    per_head = max(1, target // max(b * hkv, 1))
    split = max(bt, triton.cdiv(triton.cdiv(max(t, 1), per_head), bt) * bt)
    ns = triton.cdiv(max(t, 1), split)
    bg = max(16, triton.next_power_of_2(g))
    o_part = torch.empty(b * hq, ns + has_win, d, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(b * hq, ns + has_win, device=q.device, dtype=torch.float32)
    out = torch.empty(b, hq, d, device=q.device, dtype=q.dtype)
    qk_scale = (1.0 / math.sqrt(d) if scale is None else scale) * math.log2(math.e)
    qc = q.contiguous()
    grid = (ns + has_win, b * hkv)
    launch = {} if cfg["maxnreg"] is None else {"maxnreg": int(cfg["maxnreg"])}  # CUDA-only option
    common = (qc, kc, ks, km, vc, vs, vm, rot16, cbk, cbv, lengths, wk, wv, wlen, o_part, lse_part)
    common += (qk_scale, hkv, t, tgk, tgv, w_cap, ns, split, g, bg, d, bt, has_win)
    if use_vq:
        assert vq is not None
        _split_vq_kernel[grid](
            qc,
            kc,
            ks,
            vc,
            vs,
            rot16,
            vq["key_words"],
            vq["value_words"],
            lengths,
            wk,
            wv,
            wlen,
            o_part,
            lse_part,
            qk_scale,
            hkv,
            t,
            w_cap,
            ns,
            split,
            g,
            bg,
            d,
            bt,
            has_win,
            lk.bits,
            lk.vec,
            lv.bits,
            lv.vec,
            q.is_cuda if cfg["asm"] is None else bool(cfg["asm"]),
            True if cfg["gather"] is None else bool(cfg["gather"]),  # smem gathers: 422 vs 795 us
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
            **launch,
        )
    elif sub:
        kw = sub_word(lk, d, 16)
        vw = sub_word(lv, d, 16 * cfg["num_warps"])
        magic = q.is_cuda and magic_measured_faster(lk) if cfg["magic"] is None else bool(cfg["magic"])
        common = (qc, as_words(kc, kw[0]), ks, km, as_words(vc, vw[0]), *common[5:])
        _split_sub_kernel[grid](
            *common,
            lk.bits,
            *word_args(lk, d, kw),
            *word_args(lv, d, vw),
            *sub_args(lk, d, cfg["select"]),
            *sub_args(lv, d, cfg["select"]),
            magic_args(lk, d, kw, magic, vq["key_bits"] if vq else None),
            magic_args(lv, d, vw, magic, vq["value_bits"] if vq else None),
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
            **launch,
        )
    else:
        _split_kernel[grid](
            *common,
            *role_args(lk, d, bt, cfg["select"]),
            *role_args(lv, d, bt, cfg["select"]),
            prefetch_measured_faster(lk) if cfg["prefetch"] is None else bool(cfg["prefetch"]),
            (gather_measured_faster(lk) if cfg["gather"] is None else bool(cfg["gather"]))
            and gather_ok(lk)
            and gather_ok(lv),
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
            **launch,
        )
    rot_v = lv.kind == "vq"
    dc = min(32, d) if rot_v else d
    _reduce_kernel[(b * hkv, d // dc)](
        o_part,
        lse_part,
        lengths,
        wlen,
        rot32,
        out,
        hkv,
        ns,
        split,
        g,
        bg,
        d,
        4,
        has_win,
        rot_v,
        dc,
        num_warps=4,
    )
    return out
