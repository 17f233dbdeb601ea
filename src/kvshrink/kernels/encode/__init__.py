"""Fused encode for rotation + codebook codecs (TurboQuant, FibQuant).

``encode_vq`` returns exactly what the codec's own encode stores (``codes``, ``norm``), or appends
into cache tensors at per-sequence positions (a decode step's new token). Triton on CUDA, the
torch reference otherwise; ``backend="triton"`` forces the kernel (``TRITON_INTERPRET=1`` on CPU).
"""

from __future__ import annotations

import weakref
from typing import Literal

import torch

from ...codecs.base import Codec, Role
from ...core.errors import InputError
from ..layout import layout_of, rotation_matrix
from .reference import encode_vq_ref, nearest_codeword

__all__ = ["encode_vq", "encode_vq_ref", "nearest_codeword"]


def encode_vq(
    x: torch.Tensor,
    codec: Codec,
    role: Role = "key",
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    start: torch.Tensor | None = None,
    backend: Literal["auto", "triton", "reference"] = "auto",
    mma: bool | None = None,
    keyed: bool | None = None,
    block: int | None = None,
    num_warps: int | None = None,
    maxnreg: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``x`` [B, Hkv, T, d] with ``codec``'s rotation and ``role`` codebook.

    Returns ``(codes, norm)``: uint8 ``[B, Hkv, T, row_bytes]`` and fp16 ``[B, Hkv, T]``, or the
    ``out`` cache tensors (capacity ``TCAP``) with rows ``start[b] .. start[b]+T`` written.
    ``mma``: the kernel's nearest-codeword search on tensor cores (None: where it measured faster,
    8- and 16-wide blocks of >= 64 codewords; see ``kernel.py`` and ``pad.py``); ``keyed``: its
    one-int ``min`` form (None: wherever supported, when the tensor-core search runs);
    ``block``, ``num_warps``, ``maxnreg``: the kernel's launch (rows per program, warps, register
    cap), for sweeps; the defaults are the measured ones.
    """
    if x.dim() != 4:
        raise InputError(f"encode_vq: expected x of shape [B, Hkv, T, d], got {tuple(x.shape)}")
    d = x.shape[-1]
    layout = layout_of(codec, role, d)
    if layout.kind != "vq":
        raise InputError(f"encode_vq: {codec.spec} is not a rotation + codebook codec")
    rot, cb, padded, cn2 = _shared(codec, d, role, x.device)
    use_triton = backend == "triton" or (backend == "auto" and x.is_cuda and _has_triton())
    if not use_triton or layout.unsupported(d):
        return encode_vq_ref(x, rot, cb, out, start)
    from .kernel import encode_vq_triton

    b, hkv, t, _ = x.shape
    if out is None:
        out = (
            torch.empty(b, hkv, t, layout.row_bytes(d), dtype=torch.uint8, device=x.device),
            torch.empty(b, hkv, t, dtype=torch.float16, device=x.device),
        )
    if start is None:
        start = torch.zeros(b, dtype=torch.int32, device=x.device)
    encode_vq_triton(
        x,
        rot,
        cb,
        layout,
        out[0],
        out[1],
        start,
        block=block,
        num_warps=num_warps,
        mma=mma,
        padded=padded,
        cn2=cn2,
        keyed=keyed,
        maxnreg=maxnreg,
    )
    return out


_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _shared(
    codec: Codec, d: int, role: Role, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotation, codebook, padded codebook (the tensor-core search's) and the codewords' squared
    norms on ``device``, cached: no host copies and no extra kernels on the hot path (a decode
    step encodes one token; CUDA graphs)."""
    from .pad import pad_codebook

    per = _SHARED.setdefault(codec, {})
    key = (d, role, str(device))
    if key not in per:
        cb = codec.codebook(d, role).float().to(device).contiguous()  # type: ignore[attr-defined]
        per[key] = (
            rotation_matrix(codec, d).to(device).contiguous(),
            cb,
            pad_codebook(cb),
            (cb * cb).sum(-1),
        )
    return per[key]


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None
