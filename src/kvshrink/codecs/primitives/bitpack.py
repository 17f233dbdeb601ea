"""Fixed-width bit packing, row by row.

Each row (one cached vector's codes) packs into its own run of bytes, so any token decodes
without touching its neighbours (random access) and a GPU kernel can address row ``t`` at byte
``t * row_bytes``. Bits are little-endian inside a row: code ``j`` occupies bits
``[j*bits, (j+1)*bits)`` of the row read as one long little-endian integer. The padding to a
whole byte is real storage and is counted by whoever counts ``nbytes``.
"""

from __future__ import annotations

import torch

from ...core.errors import InputError

__all__ = ["pack_rows", "row_bytes", "unpack_rows"]


def row_bytes(n: int, bits: int) -> int:
    """Bytes one row of ``n`` codes of ``bits`` bits occupies."""
    return (n * bits + 7) // 8


def _check(bits: int) -> None:
    if not 1 <= bits <= 62:
        raise InputError(f"bit width must be in 1..62, got {bits}")


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[..., n]`` (each ``< 2**bits``) into uint8 ``[..., row_bytes(n, bits)]``."""
    _check(bits)
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    nb = row_bytes(n, bits)
    if codes.numel() == 0:
        return torch.zeros(*lead, nb, dtype=torch.uint8, device=codes.device)
    codes = codes.reshape(-1, n).to(torch.int64)
    if bits in (1, 2, 4, 8):
        per = 8 // bits
        pad = (-n) % per
        if pad:
            codes = torch.nn.functional.pad(codes, (0, pad))
        grouped = codes.view(codes.shape[0], -1, per)
        shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
        out = (grouped << shifts).sum(-1).to(torch.uint8)
        return out.reshape(*lead, nb)
    # general width: expand to bits, regroup by 8
    pos = torch.arange(bits, device=codes.device, dtype=torch.int64)
    bitplane = (codes.unsqueeze(-1) >> pos) & 1  # [R, n, bits]
    flat = bitplane.reshape(codes.shape[0], n * bits)
    pad = nb * 8 - n * bits
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    weights = 1 << torch.arange(8, device=codes.device, dtype=torch.int64)
    out = (flat.view(codes.shape[0], nb, 8) * weights).sum(-1).to(torch.uint8)
    return out.reshape(*lead, nb)


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: uint8 ``[..., row_bytes]`` to int64 codes ``[..., n]``."""
    _check(bits)
    nb = packed.shape[-1]
    if nb != row_bytes(n, bits):
        raise InputError(f"packed rows hold {nb} bytes, expected {row_bytes(n, bits)} for {n}x{bits} bits")
    lead = packed.shape[:-1]
    if packed.numel() == 0:
        return torch.zeros(*lead, n, dtype=torch.int64, device=packed.device)
    if bits == 8:  # one index per byte: a widening copy, no shifts
        return packed[..., :n].to(torch.int64)
    p = packed.reshape(-1, nb).to(torch.int64)
    if bits in (1, 2, 4, 8):
        per = 8 // bits
        shifts = torch.arange(per, device=p.device, dtype=torch.int64) * bits
        codes = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(p.shape[0], -1)[:, :n].reshape(*lead, n)
    shifts = torch.arange(8, device=p.device, dtype=torch.int64)
    flat = ((p.unsqueeze(-1) >> shifts) & 1).reshape(p.shape[0], nb * 8)[:, : n * bits]
    weights = 1 << torch.arange(bits, device=p.device, dtype=torch.int64)
    codes = (flat.view(p.shape[0], n, bits) * weights).sum(-1)
    return codes.reshape(*lead, n)
