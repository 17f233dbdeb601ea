"""Compiled CPU loops for product-quantization scans over codes (numba), beside the PyTorch form.

Why: a decode step on the CPU scores packed FibQuant keys by table lookup and sums values into a
per-(block, codeword) histogram (:mod:`kvshrink.cache.lut`). In PyTorch those are
``torch.gather`` and ``scatter_add_`` over an index expanded per query row: about 12 ns per lookup
on one core, which made attention over 2-bit codes 2-3x slower than SDPA over float32 keys. The
same loops compiled spend about half a nanosecond per lookup (the table row stays in L1), so
reading codes becomes cheaper than reading floats, as it should be.

Both functions take the exact tensors of the PyTorch path and return what it returns; they are
tested against it (``tests/kernels/test_lut_cpu.py``). numba is a dependency of kvshrink; if it
cannot be imported (an exotic platform), :func:`available` is False and callers keep PyTorch.
Loops are serial: the caller's thread is the unit of parallelism (one torch thread in the
benchmarks, so the comparison with DynamicCache is like for like).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["available", "code_histogram", "code_scores", "lut_histogram", "lut_scores"]


@functools.cache
def _kernels():
    try:
        import numba
    except Exception:  # pragma: no cover - numba is a dependency; this is the escape hatch
        return None

    # Loop order: query row outside the tokens, so one row's table (m·N floats, 16 KB at N=256,
    # m=16) stays in L1 while every token's indices stream past it; rows inside the tokens
    # measured 1.7x slower (three tables evict each other).
    @numba.njit(cache=True, nogil=True)
    def scores(idx, table, norm, out):  # pragma: no cover - compiled
        # idx [BH, T, m] int (block-offset), table [BH, R, m*N], norm [BH, T], out [BH, R, T]
        bh_n, t_n, m = idx.shape
        r_n = table.shape[1]
        for bh in range(bh_n):
            for r in range(r_n):
                tab = table[bh, r]
                for t in range(t_n):
                    row = idx[bh, t]
                    s = numba.float32(0.0)
                    for j in range(m):
                        s += tab[row[j]]
                    out[bh, r, t] = s * norm[bh, t]

    @numba.njit(cache=True, nogil=True)
    def histogram(idx, w, hist):  # pragma: no cover - compiled
        # idx [BH, T, m], w [BH, R, T] (p · norm), hist [BH, R, m*N] (zeroed)
        bh_n, t_n, m = idx.shape
        r_n = w.shape[1]
        for bh in range(bh_n):
            for r in range(r_n):
                h = hist[bh, r]
                for t in range(t_n):
                    wv = w[bh, r, t]
                    row = idx[bh, t]
                    for j in range(m):
                        h[row[j]] += wv

    return scores, histogram


def available() -> bool:
    """numba compiled the loops (checked once; the import costs ~0.5 s)."""
    return _kernels() is not None


def _flat(x: torch.Tensor, lead: int) -> torch.Tensor:
    n = 1
    for s in x.shape[:lead]:
        n *= s
    return x.reshape(n, *x.shape[lead:]).contiguous()


def lut_scores(idx: torch.Tensor, table: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``out[b,h,r,t] = norm[b,h,t] · Σ_j table[b,h,r, idx[b,h,t,j]]``.

    ``idx`` ``[B, H, T, m]`` int (each block's index already offset by ``block · N``),
    ``table`` ``[B, H, R, m·N]`` float32, ``norm`` ``[B, H, T]``; returns ``[B, H, R, T]`` float32.
    """
    b, h, t, _ = idx.shape
    r = table.shape[2]
    out = torch.empty(b * h, r, t, dtype=torch.float32)
    scores = _kernels()[0]
    scores(
        _flat(idx, 2).numpy(), _flat(table.float(), 2).numpy(), _flat(norm.float(), 2).numpy(), out.numpy()
    )
    return out.view(b, h, r, t)


def lut_histogram(idx: torch.Tensor, w: torch.Tensor, size: int) -> torch.Tensor:
    """``hist[b,h,r, idx[b,h,t,j]] += w[b,h,r,t]`` over ``t, j``: ``[B, H, R, size]`` float32."""
    b, h = idx.shape[:2]
    r = w.shape[2]
    hist = torch.zeros(b * h, r, size, dtype=torch.float32)
    histogram = _kernels()[1]
    histogram(_flat(idx, 2).numpy(), _flat(w.float(), 2).numpy(), hist.numpy())
    return hist.view(b, h, r, size)


@functools.cache
def _code_kernels(bits: int):
    """Scans straight from bit-packed index rows (``pack_rows``: index j at bits
    [j·bits, (j+1)·bits), little-endian), so a contiguous store is read without unpacking a copy.

    Compiled once per index width, with the width a constant: for widths dividing 8 the loop over
    a byte's indices unrolls (6 ms instead of 46 ms for 4.7M 2-bit lookups, measured); 3- and
    6-bit indices straddle bytes and take the generic two-byte extract. Not cached on disk
    (closures); compiling takes well under a second.
    """
    import numba
    import numpy as np

    mask = (1 << bits) - 1
    per = 8 // bits if 8 % bits == 0 else 0

    @numba.njit(nogil=True, inline="always")
    def straddled(row, j):  # pragma: no cover - compiled
        """Index j of a row whose indices may straddle two bytes (3 or 6 bits)."""
        pos = j * bits
        byte = pos >> 3
        word = np.int32(row[byte])
        if byte + 1 < row.shape[0]:
            word |= np.int32(row[byte + 1]) << 8
        return (word >> (pos & 7)) & mask

    @numba.njit(nogil=True, inline="always")
    def row_sum(tab, row, m, n_lev):  # pragma: no cover - compiled
        s = numba.float32(0.0)
        if per:
            base = 0
            for byte in range(row.shape[0]):
                v = np.int32(row[byte])
                for k in range(per):
                    s += tab[base + ((v >> (k * bits)) & mask)]
                    base += n_lev
        else:
            for j in range(m):
                s += tab[j * n_lev + straddled(row, j)]
        return s

    @numba.njit(nogil=True, inline="always")
    def row_add(h, row, m, n_lev, wv):  # pragma: no cover - compiled
        if per:
            base = 0
            for byte in range(row.shape[0]):
                v = np.int32(row[byte])
                for k in range(per):
                    h[base + ((v >> (k * bits)) & mask)] += wv
                    base += n_lev
        else:
            for j in range(m):
                h[j * n_lev + straddled(row, j)] += wv

    # Loop order as in _kernels: one query row's table stays in L1 across the tokens.
    @numba.njit(nogil=True)
    def scores(codes, n_tok, n_lev, table, norm, out):  # pragma: no cover - compiled
        # codes [BH, T, RB] uint8 (m*bits <= 8*RB), table [BH, R, m*N], norm [BH, T], out [BH, R, n_tok]
        m = table.shape[2] // n_lev
        for bh in range(codes.shape[0]):
            for r in range(table.shape[1]):
                tab = table[bh, r]
                for t in range(n_tok):
                    out[bh, r, t] = row_sum(tab, codes[bh, t], m, n_lev) * norm[bh, t]

    @numba.njit(nogil=True)
    def histogram(codes, n_tok, n_lev, w, hist):  # pragma: no cover - compiled
        # codes [BH, T, RB] uint8, w [BH, R, n_tok] (p · norm), hist [BH, R, m*N] (zeroed)
        m = hist.shape[2] // n_lev
        for bh in range(codes.shape[0]):
            for r in range(w.shape[1]):
                h = hist[bh, r]
                for t in range(n_tok):
                    row_add(h, codes[bh, t], m, n_lev, w[bh, r, t])

    return scores, histogram


def code_scores(codes: torch.Tensor, n: int, bits: int, levels: int, table: torch.Tensor, norm: torch.Tensor):
    """:func:`lut_scores` over the first ``n`` bit-packed rows of ``codes`` ``[B, H, T, RB]``:
    ``[B, H, R, n]`` float32 (``table`` ``[B, H, R, m·levels]``, ``norm`` ``[B, H, >= n]``)."""
    b, h = codes.shape[:2]
    r = table.shape[2]
    out = torch.empty(b * h, r, n, dtype=torch.float32)
    _code_kernels(bits)[0](
        _flat(codes, 2).numpy(),
        n,
        levels,
        _flat(table.float(), 2).numpy(),
        _flat(norm[..., :n].float(), 2).numpy(),
        out.numpy(),
    )
    return out.view(b, h, r, n)


def code_histogram(codes: torch.Tensor, n: int, bits: int, levels: int, w: torch.Tensor, m: int):
    """:func:`lut_histogram` over the first ``n`` bit-packed rows of ``codes``: ``w``
    ``[B, H, R, n]`` → ``[B, H, R, m·levels]`` float32."""
    b, h = codes.shape[:2]
    r = w.shape[2]
    hist = torch.zeros(b * h, r, m * levels, dtype=torch.float32)
    _code_kernels(bits)[1](_flat(codes, 2).numpy(), n, levels, _flat(w.float(), 2).numpy(), hist.numpy())
    return hist.view(b, h, r, m * levels)
