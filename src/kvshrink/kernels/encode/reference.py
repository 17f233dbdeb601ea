"""Rotation + codebook encode (TurboQuant, FibQuant) in readable PyTorch: the fused kernel's spec.

For each vector x: ``norm = ‖x‖`` (stored fp16), ``y = Π (x / norm)``, each block of ``vec``
coordinates of ``y`` takes the index of its nearest codeword, ``argmin_n ‖c_n‖² − 2⟨y_j, c_n⟩``
(first index on exact ties, as ``torch.argmin``), and the indices pack with ``pack_rows``.
Bytes: read x once, write ``row_bytes + 2`` per vector.
"""

from __future__ import annotations

import math

import torch

from ...codecs.primitives.bitpack import pack_rows

__all__ = ["encode_vq_ref", "nearest_codeword"]

_TINY = torch.finfo(torch.float32).tiny  # a zero vector encodes as norm 0 with finite indices


def nearest_codeword(y: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Indices ``[..., d/vec]`` of the nearest codeword to each ``vec``-block of ``y`` [..., d]."""
    vec = codebook.shape[1]
    blocks = y.reshape(*y.shape[:-1], y.shape[-1] // vec, vec)  # [..., R, vec]
    dist = (codebook * codebook).sum(-1) - 2.0 * (blocks @ codebook.T)  # [..., R, N]
    return dist.argmin(-1)


def encode_vq_ref(
    x: torch.Tensor,
    rotation: torch.Tensor,
    codebook: torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``x`` [B, Hkv, T, d] into (codes uint8 [B, Hkv, T, row_bytes], norm fp16 [B, Hkv, T]).

    With ``out`` (cache tensors of capacity ``TCAP``) and ``start`` [B], row ``t`` of sequence ``b``
    is written at ``start[b] + t`` instead: the append path of a decode step.
    """
    bits = round(math.log2(codebook.shape[0]))
    xf = x.float()
    norm = xf.norm(dim=-1)  # [B, Hkv, T]
    y = (xf / norm.clamp_min(_TINY).unsqueeze(-1)) @ rotation.float().T
    codes = pack_rows(nearest_codeword(y, codebook.float()), bits)
    norm16 = norm.half()
    if out is None:
        return codes, norm16
    codes_out, norm_out = out
    t = x.shape[-2]
    for b in range(x.shape[0]):
        s = int(start[b]) if start is not None else 0
        codes_out[b, :, s : s + t] = codes[b]
        norm_out[b, :, s : s + t] = norm16[b]
    return codes_out, norm_out
