"""The kernels' view of a packed cache: which layout a codec's ``Packed`` tensors follow.

Kernels do not know codecs; they know four layouts, each a handful of integers that become
``tl.constexpr`` flags, so one kernel source specializes per codec without an if-chain on names:

- ``token``: per-token scale (and optional min) per group of channels: int4/int8 absmax
  (``value = (code - zero) * scale``) and KIVI values (``value = code * scale + min``);
- ``channel``: per-channel scale and min shared by a group of tokens: KIVI keys;
- ``vq``: a rotated unit vector cut into blocks of ``vec`` coordinates, each block one index into
  a shared ``[N, vec]`` codebook, times a per-token fp16 norm: TurboQuant (``vec=1``) and FibQuant.

Index rows follow :func:`kvshrink.codecs.primitives.bitpack.pack_rows`: index ``i`` sits at bits
``[i*bits, (i+1)*bits)`` of its row. Kernels read a row as *words* of ``word_bytes`` bytes holding
``per_word`` whole indices (1 byte for 1/2/4/8 bits, 3 bytes for 3/6 bits), so no index straddles
a word even when it straddles a byte.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from ..codecs.base import Codec, Packed, Role
from ..core.errors import InputError

__all__ = [
    "CodeLayout",
    "VQCodec",
    "dequantize",
    "layout_of",
    "packed_unsupported",
    "rotation_matrix",
    "supported_bits",
]

Kind = Literal["token", "channel", "vq"]
supported_bits = (1, 2, 3, 4, 6, 8)


class VQCodec(Protocol):
    """What a rotation + codebook codec (TurboQuant, FibQuant) exposes as shared state."""

    def rotation(self, d: int) -> object: ...  # has ``.matrix`` [d, d] fp32, y = Π x

    def codebook(self, d: int, role: Role) -> torch.Tensor: ...  # [N, vec] fp32


@dataclass(frozen=True)
class CodeLayout:
    """Integers that say how one role's codes become values (see module docstring)."""

    kind: Kind
    bits: int  # bits per stored index
    vec: int = 1  # coordinates per index (codebook block size); 1 for scalar codes
    group: int = 0  # 'token': channels per scale; 'channel': tokens per scale; 0 = whole vector
    zero: int = 0  # subtracted from codes before scaling (symmetric absmax: 2**(bits-1)-1)
    has_min: bool = False  # a per-group min is added (asymmetric, KIVI)
    levels: int = 0  # codebook size N ('vq' only)

    @property
    def word_bytes(self) -> int:
        return 1 if 8 % self.bits == 0 else 3

    @property
    def per_word(self) -> int:
        return self.word_bytes * 8 // self.bits

    def row_bytes(self, d: int) -> int:
        return (d // self.vec * self.bits + 7) // 8

    def unsupported(self, d: int) -> str | None:
        """Why the Triton kernels cannot take this layout at head dim ``d`` (None: they can)."""
        pow2 = d >= 16 and d & (d - 1) == 0
        if not pow2:
            return f"head dim {d} is not a power of two >= 16"
        if self.bits not in supported_bits:
            return f"{self.bits}-bit indices (supported: {supported_bits})"
        if self.vec & (self.vec - 1) or d % self.vec:
            return f"codebook block {self.vec} is not a power of two dividing {d}"
        n_idx = d // self.vec
        if n_idx % self.per_word:
            return f"{n_idx} indices of {self.bits} bits do not fill whole {self.word_bytes}-byte words"
        if self.kind == "token" and (self.group % self.per_word or d % self.group):
            return f"channel group {self.group} must divide {d} and be a multiple of {self.per_word}"
        if self.kind == "channel" and self.group & (self.group - 1):
            return f"token group {self.group} is not a power of two"
        return None


_KNOWN = {"token": {"codes", "scale", "min"}, "channel": {"codes", "scale", "min"}, "vq": {"codes", "norm"}}


def packed_unsupported(packed: Packed, layout: CodeLayout, d: int) -> str | None:
    """Why the kernels cannot read ``packed`` as ``layout`` (None: they can).

    Tensors they do not know would change the maths (a QJL sketch, a stored key mean) or the token
    order (codec-held sinks/window: pass recent tokens as the kernel's window instead); KIVI's
    ``residual`` is ignored by design. Mixed-radix or padded index rows are not read either.
    """
    extra = set(packed.tensors) - _KNOWN[layout.kind] - {"residual"}
    extra = {k for k in extra if packed.tensors[k].numel()}
    if extra:
        return f"packed tensors {sorted(extra)} are not read by the kernel"
    meta = packed.meta
    if meta.get("radix_width", 0) or meta.get("pad", 0):
        return "mixed-radix or padded index rows"
    return layout.unsupported(d)


def _is_vq(codec: Codec) -> bool:
    return callable(getattr(codec, "codebook", None)) and callable(getattr(codec, "rotation", None))


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layout_of(codec: Codec, role: Role, d: int) -> CodeLayout:
    """The layout of ``codec``'s packed ``role`` tensors at head dim ``d`` (memoized per codec:
    a decode step asks for it once per layer, and it costs a codebook lookup)."""
    per = _LAYOUTS.setdefault(codec, {})
    if (role, d) not in per:
        per[(role, d)] = _layout_of(codec, role, d)
    return per[(role, d)]


def _layout_of(codec: Codec, role: Role, d: int) -> CodeLayout:
    name = codec.config.name
    if _is_vq(codec):
        n, vec = codec.codebook(d, role).shape  # type: ignore[attr-defined]
        bits = round(math.log2(n))
        if 1 << bits != n:
            raise InputError(f"{codec.spec}: codebook of {n} entries is not a power of two")
        return CodeLayout("vq", bits, vec=int(vec), levels=int(n))
    if name in ("int4", "int8"):
        bits = codec.config.bits  # type: ignore[attr-defined]
        group = codec.config.group or d  # type: ignore[attr-defined]
        return CodeLayout("token", bits, group=group, zero=(1 << (bits - 1)) - 1)
    if name == "kivi":
        b, group = codec.config.b, codec.config.group  # type: ignore[attr-defined]
        kind: Kind = "channel" if role == "key" else "token"
        return CodeLayout(kind, b, group=group, has_min=True)
    raise InputError(
        f"{codec.spec}: no packed-attention layout; valid: int4, int8, kivi, and codecs with "
        "rotation()/codebook() (turboquant, fibquant)"
    )


def rotation_matrix(codec: Codec, d: int) -> torch.Tensor:
    """Π as an fp32 ``[d, d]`` tensor (``y = Π x``), whether ``rotation`` returns it or wraps it."""
    rot = codec.rotation(d)  # type: ignore[attr-defined]
    return getattr(rot, "matrix", rot).float()


def dequantize(
    packed: Packed | dict[str, torch.Tensor],
    layout: CodeLayout,
    d: int,
    codec: Codec | None = None,
    role: Role = "key",
) -> torch.Tensor:
    """Readable fp32 dequantization of every packed row: ``[..., T, d]`` (the layouts' spec)."""
    from ..codecs.primitives.bitpack import unpack_rows

    tz = packed.tensors if isinstance(packed, Packed) else packed
    codes = unpack_rows(tz["codes"], layout.bits, d // layout.vec)  # [..., T, d/vec]
    *lead, t, _ = codes.shape
    if layout.kind == "vq":
        assert codec is not None, "vq layouts need the codec's rotation and codebook"
        cb = codec.codebook(d, role).float().to(codes.device)  # type: ignore[attr-defined]
        y = cb[codes].reshape(*lead, t, d)  # rotated unit vector, block by block
        x = y @ rotation_matrix(codec, d).to(codes.device)  # x = Πᵀ y, as rows
        return x * tz["norm"].float().unsqueeze(-1)
    x = codes.float() - layout.zero
    scale = tz["scale"].float()
    mn = tz["min"].float() if layout.has_min else None
    if layout.kind == "token":  # scale [..., T, d/group]
        xg = x.reshape(*lead, t, d // layout.group, layout.group) * scale.unsqueeze(-1)
        if mn is not None:
            xg = xg + mn.unsqueeze(-1)
        return xg.reshape(*lead, t, d)
    # 'channel': scale [..., ceil(T/group), d], one row per group of tokens
    scale = scale.repeat_interleave(layout.group, dim=-2)[..., :t, :]
    out = x * scale
    if mn is not None:
        out = out + mn.repeat_interleave(layout.group, dim=-2)[..., :t, :]
    return out
