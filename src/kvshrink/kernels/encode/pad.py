"""Operands of the encode kernel's tensor-core search, built on the host (no Triton import:
``encode_vq`` caches them beside the codebook on any device)."""

from __future__ import annotations

import torch

from ..layout import CodeLayout

__all__ = [
    "KP",
    "SEARCH_FLAGS",
    "default_search",
    "keyed_supported",
    "mma_ok",
    "mma_supported",
    "pad_codebook",
    "resolve_search",
    "supported_searches",
]

#: the nearest-codeword searches by name: ``encode_vq``'s ``(mma, keyed)`` for each
SEARCH_FLAGS = {"loop": (False, False), "mma": (True, False), "keyed": (True, True)}

#: block coordinates padded to the tensor-core K of a tf32 ``tl.dot``
KP = 16


def mma_supported(layout: CodeLayout, d: int) -> bool:
    """Layouts the tensor-core search can serve: vector blocks whose width divides ``KP``, a
    power-of-two number of blocks per vector, and at least one 64-codeword chunk."""
    r = d // layout.vec
    return layout.vec > 1 and KP % layout.vec == 0 and layout.levels >= 64 and r & (r - 1) == 0


def keyed_supported(layout: CodeLayout, d: int) -> bool:
    """Where the tensor-core search can key distance and index in one int32: two spare padded
    columns (blocks at most ``KP // 2`` wide) and at most 256 codewords (the index takes the
    distance's low mantissa bits, 2^-15 of it)."""
    return mma_supported(layout, d) and layout.vec <= KP // 2 and layout.levels <= 256


def mma_ok(layout: CodeLayout, d: int) -> bool:
    """Where the tensor-core search is the default: supported layouts with 8- or 16-wide blocks.
    Measured on an H100 (32k-token K+V encode, docs/results/decode-attention-h100-notes.md):
    FibQuant b=1, k=8 (N=256) 2.7 ms against 6.9-10.2 ms for the CUDA-core loop; at k=4 (N=256)
    and k=2 the padded rows (R = d/vec of them per vector, each argmin'd over N) cost as much
    as the loop or more (4.7 vs 4.6 ms at k=4, 9.2 vs 3.4 ms at k=2), so those keep the loop.
    The keyed form (one int ``min`` per score) did not change that at k=4: 4.5 ms at its best
    config against the loop's 4.8, 5.8 ms at the default one; at k=8 it took 2.67 -> 2.44 ms
    (docs/results/decode-attention-encode-h100.md), so it is the default there."""
    return mma_supported(layout, d) and layout.vec >= 8


def supported_searches(layout: CodeLayout, d: int) -> list[str]:
    """The searches the encode kernel can run for ``layout`` (the loop always)."""
    return ["loop"] + ["mma"] * mma_supported(layout, d) + ["keyed"] * keyed_supported(layout, d)


def resolve_search(layout: CodeLayout, d: int, mma: bool | None, keyed: bool | None) -> tuple[bool, bool]:
    """``(mma, keyed)`` the encode kernel runs for ``encode_vq``'s arguments: None picks the
    measured default (:func:`mma_ok`, then keyed wherever :func:`keyed_supported`)."""
    use_mma = mma_ok(layout, d) if mma is None else mma
    return use_mma, use_mma and (keyed_supported(layout, d) if keyed is None else keyed)


def default_search(layout: CodeLayout, d: int) -> str:
    """The name of the search ``encode_vq`` runs when neither ``mma`` nor ``keyed`` is given."""
    flags = resolve_search(layout, d, None, None)
    return next(name for name, f in SEARCH_FLAGS.items() if f == flags)


def pad_codebook(codebook: torch.Tensor) -> torch.Tensor | None:
    """``[KP, N]``: the codebook transposed, coordinate ``c`` on row ``c·(KP // vec)`` (where the
    kernel's interleaved zero-padding puts it); where ``vec <= KP // 2``, rows 1 and 3 hold
    ``−‖c‖²/2`` and ``−1`` for the keyed search (the plain one multiplies them by its zero
    padding); zeros elsewhere. None where ``vec`` does not divide ``KP`` (k = 3, 6: those keep
    the CUDA-core search)."""
    n, vec = codebook.shape
    if KP % vec:
        return None
    cb = codebook.float()
    out = codebook.new_zeros(KP, n, dtype=torch.float32)
    out[:: KP // vec] = cb.T
    if vec <= KP // 2:
        out[1] = -0.5 * (cb * cb).sum(-1)
        out[3] = -1.0
    return out.contiguous()
