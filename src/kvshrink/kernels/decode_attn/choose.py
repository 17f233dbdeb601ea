"""What the decode launcher picks per code layout, and the constexprs it passes for it.

The kernel and its knobs for a layout are what measured fastest on an H100 at B=8, L=32k
(``docs/results/decode-attention-h100-notes.md``); a ``config`` dict overrides each choice. The
``*_args`` helpers turn a :class:`~kvshrink.kernels.layout.CodeLayout` into the ``K_*``/``V_*``
constexprs of the two split kernels.
"""

from __future__ import annotations

import torch

from ..layout import CodeLayout
from .magic import PACK, lut_asm, unpack_asm

__all__ = [
    "DEFAULTS",
    "KIND",
    "DecodeConfig",
    "as_words",
    "gather_measured_faster",
    "gather_ok",
    "magic_args",
    "magic_measured_faster",
    "prefetch_measured_faster",
    "role_args",
    "sub_args",
    "sub_measured_faster",
    "sub_ok",
    "sub_word",
    "vq_measured_faster",
    "vq_ok",
    "word_args",
]

KIND = {"token": 0, "channel": 1, "vq": 2}


class DecodeConfig(dict):
    """Launch knobs: ``BT`` tokens per block, ``num_warps``, ``num_stages``, ``programs``
    (target split programs; default 4 per SM), ``select`` (selects instead of a gather for
    N <= 4 scalar levels), ``sub`` (True/False: force the sub-stream kernel on or off), and for
    the general kernel ``prefetch`` (load the next block's codes while the current one is decoded)
    and ``gather`` (VQ codewords by ``tl.gather`` from a shared-memory copy of the codebook instead
    of L1 loads), ``magic`` (sub-stream kernel: integer codes and 16-level codebooks to fp16 by
    the PTX of ``magic.py``; None: on CUDA where it measured faster), ``vq`` (True/False: the
    vector-codebook kernel of ``kernel_vq.py`` for FibQuant) and its ``asm`` (codeword words split
    into fp16 by PTX ``mov``; None: on CUDA). ``maxnreg``: a cap on registers per thread (None:
    the compiler's choice, 216-220 for these kernels, which fits two 4-warp programs per SM; 128
    fits four, at the price of spills). ``sub``, ``prefetch`` and ``gather`` left at None: where
    they measured faster."""


def role_args(lay: CodeLayout, d: int, bt: int, select: bool) -> tuple:
    """The ``K_*``/``V_*`` constexprs of one role."""
    nw = d // lay.vec // lay.per_word
    sel = lay.kind == "vq" and select and lay.vec == 1 and lay.levels <= 4
    group = lay.group or d
    ng = d // group if lay.kind == "token" else 1
    ge = min(group, bt) if lay.kind == "channel" else 1
    return (
        KIND[lay.kind],
        lay.bits,
        lay.vec,
        max(lay.levels, 2),
        sel,
        lay.per_word,
        nw,
        lay.word_bytes,
        lay.row_bytes(d),
        group,
        ge,
        ng,
        lay.zero,
        lay.has_min,
    )


# Measured on an H100 (docs/results/decode-attention-h100.json, "sweep"): BT=128 with 4 warps and
# 2 stages was the fastest or within noise of it for every codec; gathers beat selects for N=4.
DEFAULTS = {
    "BT": 128,
    "num_warps": 4,
    "num_stages": 2,
    "programs": 0,
    "select": False,
    "sub": None,
    "prefetch": None,
    "gather": None,
    "magic": None,
    "vq": None,
    "asm": None,
    "maxnreg": None,
}


def gather_ok(lay: CodeLayout) -> bool:
    """Layouts ``tl.gather`` compiles for: power-of-two tiles, and not a small vector codebook
    (N <= 16 with ``vec > 1`` hit an assertion in Triton 3.6's thread-locality pass on sm_90)."""
    n = max(lay.levels, 2)
    return lay.kind != "vq" or (n & (n - 1) == 0 and (lay.vec == 1 or n >= 64))


def sub_measured_faster(lay: CodeLayout) -> bool:
    """Where the sub-stream kernel beat the stream-major one in the H100 sweeps.

    int4/int8 gain (411 vs 471 us at B=8, L=32k); KIVI (its keys need BT = group = 32) loses.
    TurboQuant b=2 and b=4 lose with the plain lookups (b=2: 523 vs 468 us) but win with the
    PTX lookups of ``magic.py`` (2026-12-07 sweep: b=2 322 vs 469 us, b=4 368 vs 491 us), which
    :func:`magic_measured_faster` turns on for them; b=3 loses either way (599 vs 1101 us).
    """
    return (lay.kind == "token" and not lay.has_min) or _tq_lut(lay)


def _tq_lut(lay: CodeLayout) -> bool:
    """A 4- or 16-level scalar codebook (TurboQuant b=2, b=4): the layouts with PTX lookups."""
    return lay.kind == "vq" and lay.vec == 1 and lay.levels in (4, 16)


def prefetch_measured_faster(lk: CodeLayout) -> bool:
    """Where loading the next block one iteration ahead beat the plain loop (H100, B=8, L=32k).

    KIVI-2 530 -> 477 us, TurboQuant b=3 658 -> 597 us; TurboQuant b=4 loses (487 -> 778 us at
    BT=128: 64 byte-words per row and block in flight cost registers), FibQuant loses 3%.
    """
    return lk.kind == "channel" or (lk.kind == "vq" and lk.vec == 1 and lk.bits == 3)


def gather_measured_faster(lk: CodeLayout) -> bool:
    """Where ``tl.gather`` from a shared-memory codebook beat L1 loads (H100, B=8, L=32k).

    FibQuant k=8 (8-wide codewords, N=256): 2758 -> 1360 us. k=4, N=256 loses (1086 -> 1513
    us); scalar codebooks gain nothing measurable.
    """
    return lk.kind == "vq" and lk.vec >= 8


def vq_ok(lk: CodeLayout, lv: CodeLayout, d: int) -> bool:
    """Whether the vector-codebook kernel (``kernel_vq.py``) takes these layouts: ``vec`` of 2, 4
    or 8 fp16 (one or two 32/64-bit words per codeword), indices that tile a byte, and at least
    16 bytes per row (the sub-stream tiles are ``[BT, row bytes]``, ``tl.dot`` needs K >= 16)."""

    def one(lay: CodeLayout) -> bool:
        ok = lay.kind == "vq" and lay.vec in (2, 4, 8) and lay.bits in (1, 2, 4, 8)
        return ok and d % (lay.vec * 8 // lay.bits) == 0 and d // (lay.vec * 8 // lay.bits) >= 16

    return one(lk) and one(lv)


def vq_measured_faster(lk: CodeLayout) -> bool:
    """Where the vector-codebook kernel beat the general one: every FibQuant layout it takes.

    H100, B=8, L=32k (2026-12-07 sweep, ``decode-attention-h100-notes.md``), with its codewords
    gathered from shared memory (the ``gather`` default there): b=2,k=4 1087 -> 422 us, b=2,k=2
    1674 -> 382 us, b=1,k=4 1062 -> 487 us, b=1,k=8 1364 -> 546 us. From L1 instead, 795, 802,
    1107 and 1142 us."""
    return lk.kind == "vq" and lk.vec > 1


def sub_ok(lk: CodeLayout, lv: CodeLayout, d: int, cuda: bool) -> bool:
    """Whether the sub-stream kernel takes these layouts (scalar indices, same width, d/P >= 16)."""
    same = lk.vec == lv.vec == 1 and lk.bits == lv.bits
    narrow = same and d // lk.per_word >= 16
    return same and (narrow or not cuda) and (lk.kind != "channel" or lk.group >= 16)


def sub_word(lay: CodeLayout, d: int, min_nw: int) -> tuple[int, int, int]:
    """Widest word (bytes) whose ``P <= 8`` indices leave ``d/P >= min_nw`` channels per sub-stream.

    Wider words mean fewer loads, masks and pointer updates per index; the kernel reads them as
    int16/int32 (little-endian, so index ``P·w + r`` still sits at bits ``r·bits``). Keys take the
    widest (their dots split tokens across warps); values need ``d/P`` wide enough to split over
    the warps, else every warp would redo the same sub-stream.
    """
    if lay.word_bytes == 3:
        return 3, lay.per_word, d // lay.per_word
    for wby in (4, 2):
        per = wby * 8 // lay.bits
        fits = per <= 8 and d % per == 0 and lay.row_bytes(d) % wby == 0
        groups_ok = lay.kind != "token" or (lay.group or d) % per == 0  # a scale group spans whole words
        if fits and groups_ok and d // per >= min_nw:
            return wby, per, d // per
    return 1, lay.per_word, d // lay.per_word


def word_args(lay: CodeLayout, d: int, word: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """(P, NW, WB, RB) constexprs: indices per word, words per row, 3-byte flag, row stride in words."""
    wby, per, nw = word
    return per, nw, 3 if wby == 3 else 1, lay.row_bytes(d) // (1 if wby == 3 else wby)


def as_words(codes: torch.Tensor, wby: int) -> torch.Tensor:
    return codes.view({2: torch.int16, 4: torch.int32}[wby]) if wby in (2, 4) else codes


def sub_args(lay: CodeLayout, d: int, select: bool) -> tuple:
    """The ``K_*``/``V_*`` constexprs of the sub-stream kernel."""
    group = lay.group or d
    fold = lay.kind == "token" and group == d and not lay.has_min
    sel = lay.kind == "vq" and select and lay.levels <= 4
    ng = d // group if lay.kind == "token" else 1
    return (KIND[lay.kind], max(lay.levels, 2), sel, fold, lay.zero, group, ng, lay.has_min)


def magic_measured_faster(lk: CodeLayout) -> bool:
    """Where the PTX unpack of ``magic.py`` measured faster than the plain path on a GPU.

    H100, B=8, L=32k (``docs/results/decode-attention-h100.json``, 2026-12-07 sweep, same run):
    int4 (scale per 32 channels) 187 us either way at BT=128, 176 us at BT=64; int8 279 -> 222 us;
    TurboQuant b=2 469 -> 322 us and b=4 491 -> 368 us (with the sub-stream kernel). KIVI
    (967 vs 474 us), TurboQuant b=3 (1101 vs 599 us) and FibQuant (no change) keep the plain
    path. The PTX dequantizes in fp16 (one more rounding than the plain path): within 1e-3
    relative of the fp32 reference on the GPU checks."""
    return (lk.kind == "token" and lk.bits in (4, 8) and not lk.has_min) or _tq_lut(lk)


def magic_args(
    lay: CodeLayout, d: int, word: tuple[int, int, int], on: bool, codebook: tuple[int, ...] | None = None
) -> tuple[str, ...]:
    """The ``K_MAGIC``/``V_MAGIC`` constexpr of the sub-stream kernel: a PTX string per
    sub-stream for integer codes in 1-, 2- or 4-byte words; for a 4- or 16-level scalar codebook
    (TurboQuant b=2, b=4; ``codebook``: its fp16 bit patterns) the lookup asm and its
    constraints; else ``()``, the plain path.

    A symmetric layout whose scale is applied per element gets its zero point subtracted in the
    PTX (``code - zero`` is exact in fp16), so the kernel skips the separate ``- zero·scale``."""
    wby, per, _ = word
    lut_ok = (lay.bits == 4 and wby in PACK) or (lay.bits == 2 and wby in (1, 2))
    if on and lay.kind == "vq" and lay.vec == 1 and lut_ok and codebook is not None:
        asm, cons, _ = lut_asm(wby, lay.bits, list(codebook))
        return (asm, cons)
    if not on or lay.kind == "vq" or wby not in PACK or lay.bits not in (1, 2, 4, 8):
        return ()
    per_element = lay.kind == "token" and (lay.group or d) != d and not lay.has_min  # not folded
    zero = lay.zero if per_element else 0
    return tuple(unpack_asm(wby, lay.bits, r, zero)[0] for r in range(per))
