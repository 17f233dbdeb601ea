"""Rotation codec specs to merge into test_contract's SPECS (cheap codebooks: built in ~1 s),
and helpers shared by the TurboQuant and FibQuant tests."""

from __future__ import annotations

import torch

from kvshrink.codecs import Role, make_codec
from kvshrink.codecs.rotated import RotatedCodec

ROTATED_SPECS = [
    "turboquant:b=1",
    "turboquant:b=3",
    "turboquant:b=3,qjl=1",
    "turboquant:b=2,rot=hadamard,kb=4,center=1,sinks=4,window=32",
    "fibquant:b=2,k=2",
    "fibquant:b=2,k=4",
    "fibquant:b=0.5,k=8",
    "fibquant:k=6,n=7,pad=1",
    "fibquant:b=2,k=2,kb=3,vb=1.5,center=1,sinks=4,window=32",
    "fibquant:b=1.75,k=4,pca=3,pcabits=4,sinks=1",
    "turboquant:b=2,pca=2,center=1,window=8",
]


def unit_vectors(seed: int, n: int, d: int) -> torch.Tensor:
    """``[n, d]`` float32 vectors uniform on the unit sphere."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).float()


def unit_mse(spec: str, d: int = 64, n: int = 8192, seed: int = 0) -> float:
    """E‖u-û‖² over unit vectors u in R^d through the whole codec (fp16 norms included)."""
    codec = make_codec(spec)
    u = unit_vectors(seed, n, d)
    return float((codec.decode(codec.encode(u[None])) - u).pow(2).sum(-1).mean())


def codeword_input(codec: RotatedCodec, d: int, role: Role, seed: int, scale: float = 3.0):
    """A vector x whose rotated, normalized blocks are codewords, up to ‖ŷ‖ = 1 ± eps.

    Greedy search from random codeword combinations ŷ: change the one block that brings ‖ŷ‖²
    closest to 1, repeat; keep the best of several starts. Then x = scale·Πᵀŷ/‖ŷ‖ with scale exact
    in fp16, so the stored norm is exact and x̂ = x·‖ŷ‖ exactly up to float32 rounding. Returns x
    ``[1, d]``, the indices ``[1, d/k]`` and eps = |‖ŷ‖ - 1| (large for low-rate codebooks whose
    codewords cannot reach a unit norm: then no input decodes exactly).
    """
    book = codec.codebook(d, role).double()
    r2 = book.pow(2).sum(1)
    g = torch.Generator().manual_seed(seed)
    best_err, best = float("inf"), torch.zeros(codec.blocks(d), dtype=torch.long)
    for _ in range(16):
        idx = torch.randint(0, book.shape[0], (codec.blocks(d),), generator=g)
        cur = float(r2[idx].sum())
        for _ in range(40):
            new = cur + r2[None, :] - r2[idx][:, None]  # [block, candidate]: ‖ŷ‖² after one change
            j, n = divmod(int((new - 1).abs().argmin()), book.shape[0])
            if abs(float(new[j, n]) - 1) >= abs(cur - 1):
                break
            idx[j], cur = n, float(new[j, n])
        if abs(cur - 1) < best_err:
            best_err, best = abs(cur - 1), idx.clone()
    yhat = book[best].reshape(-1)
    x = scale * codec.rotation(d).matrix64.T @ (yhat / yhat.norm())
    return x.float()[None], best[None], abs(float(yhat.norm()) - 1)
