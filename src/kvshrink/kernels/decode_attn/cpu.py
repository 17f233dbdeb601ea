"""Decode attention over packed rotation-codec caches on the CPU: table scans over the codes.

The CPU counterpart of the Triton kernel for the ``vq`` layout (TurboQuant, FibQuant), with the
same arguments and the same rotated-basis algebra: the query is rotated once (``q' = Π q``), a
table of block–codeword dot products is built per query head (``m x N`` floats), each packed key
scores as ``norm · Σ_j table[j, idx_j]``, the packed and window scores share one softmax, and the
values are summed as a per-(block, codeword) histogram of ``p · norm`` that meets the codebook
once and is rotated back once (``Πᵀ``). The scans over the codes are compiled loops
(:mod:`kvshrink.kernels.lut_cpu`) reading the bit-packed rows in place; the rest is a few small
PyTorch ops per layer. Nothing is dequantized, so a step reads a byte or less per 4 coordinates
at FibQuant b=2, k=4 instead of 16 bytes of float32.

Other layouts (int4, KIVI) have no CPU kernel: :func:`cpu_unsupported` says so and callers keep
the PyTorch path for them.
"""

from __future__ import annotations

import math

import torch

from ...codecs.base import Codec, Packed
from ..layout import layout_of, packed_unsupported, rotation_matrix
from ..lut_cpu import available, code_histogram, code_scores
from .reference import Window

__all__ = ["cpu_unsupported", "decode_attention_cpu"]


def cpu_unsupported(codec: Codec, keys: Packed, values: Packed, d: int) -> str | None:
    """Why the CPU kernel cannot read these packed caches (None: it can)."""
    if not available():
        return "numba is not importable"
    for packed, role in ((keys, "key"), (values, "value")):
        layout = layout_of(codec, role, d)  # type: ignore[arg-type]
        if layout.kind != "vq":
            return f"{codec.spec}: {layout.kind} layout (the CPU kernel reads rotation codecs only)"
        why = packed_unsupported(packed, layout, d)
        if why:
            return why
    return None


def decode_attention_cpu(
    q: torch.Tensor,
    keys: Packed,
    values: Packed,
    lengths: torch.Tensor,
    window: Window | None,
    codec: Codec,
    scale: float | None = None,
) -> torch.Tensor:
    """``decode_attention`` for CPU tensors of a rotation codec; ``[B, Hq, d]`` in ``q``'s dtype.

    Sequences may hold different numbers of packed tokens (``lengths``); each is scanned up to
    the longest and the rest masked, as the window's own ``lengths`` are.
    """
    b, hq, d = q.shape
    kc, vc = keys.tensors["codes"], values.tensors["codes"]
    hkv = kc.shape[1]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kl, vl = layout_of(codec, "key", d), layout_of(codec, "value", d)
    n = int(lengths.max()) if lengths.numel() else 0
    rot = rotation_matrix(codec, d)
    qf = q.float().reshape(b, hkv, g, d)
    q_rot = qf @ rot.T  # q' = Π q, rows
    cbk = codec.codebook(d, "key").float()  # type: ignore[attr-defined]
    cbv = codec.codebook(d, "value").float()  # type: ignore[attr-defined]
    mk, mv = d // kl.vec, d // vl.vec
    table = (q_rot.reshape(b, hkv, g, mk, kl.vec) @ cbk.T).reshape(b, hkv, g, mk * kl.levels)
    parts = [code_scores(kc, n, kl.bits, kl.levels, table, keys.tensors["norm"]) * scale]
    w = values.tensors["norm"][:, :, None, :n].float()
    pad = None
    if n and bool((lengths < n).any()):  # rows past a sequence's length hold anything: mask them
        pad = torch.arange(n) >= lengths.reshape(b, 1, 1, 1)
        parts[0] = parts[0].masked_fill(pad, -math.inf)
        w = w.masked_fill(pad, 0.0)
    if window is not None:
        wk, wv = window.keys.float(), window.values.float()
        wpad = None
        if bool((window.lengths < wk.shape[2]).any()):  # slots past a window's length: mask them
            wpad = (torch.arange(wk.shape[2]) >= window.lengths.reshape(b, 1, 1)).unsqueeze(-1)  # [B,1,W,1]
            wk, wv = wk.masked_fill(wpad, 0.0), wv.masked_fill(wpad, 0.0)
        ws = (qf @ wk.transpose(-1, -2)) * scale  # [B, Hkv, G, W]
        parts.append(ws if wpad is None else ws.masked_fill(wpad.transpose(-1, -2), -math.inf))
    s = torch.cat(parts, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # a sequence with nothing to attend gets zeros
    hist = code_histogram(vc, n, vl.bits, vl.levels, p[..., :n] * w, mv)
    y = (hist.view(b, hkv, g, mv, vl.levels) @ cbv).reshape(b, hkv, g, d)
    out = y @ rot  # x = Πᵀ y, as rows
    if window is not None:
        out = out + p[..., n:] @ wv
    return out.reshape(b, hq, d).to(q.dtype)
