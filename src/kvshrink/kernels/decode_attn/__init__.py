"""Decode attention that reads packed KV caches directly (issue 6).

``decode_attention`` picks the Triton kernel for CUDA tensors when Triton is installed, the
compiled CPU scan (``cpu.py``, numba) for CPU tensors of a rotation codec, and the reference
otherwise; ``backend="triton"`` forces the kernel (CPU tensors then need ``TRITON_INTERPRET=1``,
which is how CI runs it), ``backend="cpu"`` the CPU scan. Triton is imported only when the kernel
runs.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch

from ...codecs.base import Codec, Packed, make_codec
from ...core.errors import InputError, KvshrinkError
from ..layout import layout_of, packed_unsupported
from .reference import Window, decode_attention_ref

__all__ = ["Window", "decode_attention", "decode_attention_ref", "triton_available"]

Backend = Literal["auto", "triton", "cpu", "reference"]


def triton_available() -> bool:
    """Triton is importable (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _unsupported(keys: Packed, values: Packed, codec: Codec, d: int) -> str | None:
    for packed, role in ((keys, "key"), (values, "value")):
        try:
            why = packed_unsupported(packed, layout_of(codec, role, d), d)  # type: ignore[arg-type]
        except KvshrinkError as e:
            return str(e)
        if why:
            return why
    return None


def decode_attention(
    q: torch.Tensor,
    keys: Packed,
    values: Packed,
    lengths: torch.Tensor,
    window: Window | None = None,
    *,
    codec: Codec | None = None,
    scale: float | None = None,
    backend: Backend = "auto",
    config: dict | None = None,
) -> torch.Tensor:
    """One decode step of attention over a packed cache.

    Args:
        q: ``[B, Hq, d]`` the new token's queries (Hq = G·Hkv).
        keys, values: packed caches, codes ``[B, Hkv, T, row_bytes]`` plus the codec's per-token
            tensors; only the first ``lengths[b]`` rows of sequence ``b`` are read. KIVI's own
            ``residual`` tensor is ignored: pass recent tokens as ``window``.
        lengths: ``[B]`` int, packed tokens per sequence.
        window: fp16 recent tokens ``[B, Hkv, W, d]`` with their own ``[B]`` lengths, attended in
            the same softmax.
        codec: the codec that packed the cache (default ``make_codec(keys.spec)``); TurboQuant and
            FibQuant contribute their rotation and codebooks.
        scale: softmax scale, default ``1/sqrt(d)``.
        config: Triton launch knobs (see ``choose.DecodeConfig``).

    Returns:
        ``[B, Hq, d]`` in ``q``'s dtype. A sequence with no tokens at all gets zeros.

    Example::

        codec = make_codec("int4")
        k, v = codec.encode(keys, "key"), codec.encode(values, "value")
        out = decode_attention(q, k, v, torch.tensor([t, t]))
    """
    codec = codec or make_codec(keys.spec)
    use_triton = backend == "triton" or (backend == "auto" and q.is_cuda and triton_available())
    if use_triton and backend == "auto" and _unsupported(keys, values, codec, q.shape[-1]):
        use_triton = False  # e.g. TurboQuant-prod's QJL sketch: the reference handles it
    if backend == "cpu" or (backend == "auto" and not q.is_cuda):
        from .cpu import cpu_unsupported, decode_attention_cpu

        why = cpu_unsupported(codec, keys, values, q.shape[-1])
        if why is None:
            return decode_attention_cpu(q, keys, values, lengths, window, codec, scale)
        if backend == "cpu":
            raise InputError(f"decode_attention(backend='cpu') cannot read this cache: {why}")
    if use_triton:
        from .kernel import decode_attention_triton

        return decode_attention_triton(q, keys, values, lengths, window, codec, scale, config)
    return decode_attention_ref(q, keys, values, lengths, window, codec=codec, scale=scale).to(q.dtype)
