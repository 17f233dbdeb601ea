"""The codec interface.

A codec turns cached vectors ``[..., T, d]`` (any leading dims, then tokens, then head dim)
into a :class:`Packed` fixed-rate representation and back. Codecs see the token axis because
some (KIVI's per-channel keys) group over tokens and keep a recent window in full precision;
token-wise codecs simply treat it as one more batch dim.

Contract, tested for every registered codec:
- ``decode(encode(x))`` has ``x``'s shape; ``decode_tokens(p, idx)`` equals ``decode(p)[..., idx, :]``
  without decoding the other tokens (random access);
- ``packed.nbytes()`` sums every tensor held (codes, scales, zero-points, norms, windows);
  ``codec.shared_nbytes(d)`` is what is held once per cache (codebooks, rotations);
- input is validated: floating dtype, finite, on a supported device, a head dim the codec can split.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from ..core.bytes import fp16_nbytes, tensor_nbytes
from ..core.errors import InputError
from ..core.registry import Registry
from ..core.spec import Configured, SpecConfig

__all__ = ["CODECS", "Codec", "CodecConfig", "Packed", "Role", "make_codec", "register_codec"]

Role = Literal["key", "value"]
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class CodecConfig(SpecConfig):
    """Base of codec configs. Subclasses are frozen dataclasses validated in ``__post_init__``."""

    name: ClassVar[str] = ""


@dataclass
class Packed:
    """A packed representation: named tensors plus the shape needed to decode them.

    ``tensors`` holds everything the representation keeps; nothing else is needed to decode
    except the codec's shared state (codebook, rotation), counted by ``Codec.shared_nbytes``.
    """

    spec: str
    role: Role
    shape: tuple[int, ...]
    dtype: torch.dtype
    tensors: dict[str, torch.Tensor]
    meta: dict[str, int] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.shape[-2]

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def nbytes(self) -> int:
        """Bytes held by this representation (every tensor, padding included)."""
        return tensor_nbytes(self.tensors.values())

    def bits_per_element(self) -> float:
        return self.nbytes() * 8 / max(self.numel(), 1)

    def compression_ratio(self) -> float:
        return fp16_nbytes(self.numel()) / max(self.nbytes(), 1)

    def to(self, device: torch.device | str) -> Packed:
        return Packed(
            self.spec,
            self.role,
            self.shape,
            self.dtype,
            {k: v.to(device) for k, v in self.tensors.items()},
            dict(self.meta),
        )


class Codec(Configured, ABC):
    """Base codec. Subclasses implement ``_encode``/``_decode``/``_decode_tokens``."""

    config: CodecConfig
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    #: tensors with one row per token on the token axis (``len(shape) - 2``): a Packed holding
    #: only these can be joined along the tokens (:meth:`concat_tokens`); empty = never
    per_token: ClassVar[frozenset[str]] = frozenset()
    #: meta entries that count tokens, summed when Packeds are joined (others must agree)
    token_meta: ClassVar[frozenset[str]] = frozenset()

    # -- public API -------------------------------------------------------------------------
    def check_dim(self, d: int) -> None:
        """Raise :class:`InputError` if head dim ``d`` is unsupported (override to restrict)."""

    def encode(self, x: torch.Tensor, role: Role = "key", queries: torch.Tensor | None = None) -> Packed:
        """Encode ``x`` of shape ``[..., T, d]``.

        ``queries`` ``[..., n, d]`` (same leading dims as ``x``): the queries that will read these
        keys, for codecs whose :meth:`uses_queries` says they shape the code to them.
        """
        self.validate(x)
        if role not in ("key", "value"):
            raise InputError(f"{self.spec}: role must be 'key' or 'value', got {role!r}")
        if not self.uses_queries(role):
            return self._encode(x, role)
        if queries is None or queries.shape[:-2] != x.shape[:-2] or queries.shape[-1] != x.shape[-1]:
            got = "none" if queries is None else f"shape {tuple(queries.shape)}"
            raise InputError(
                f"{self.spec}: {role}s are coded for their queries; pass queries=[..., n, d] with the "
                f"leading dims and d of x {tuple(x.shape)} (got {got})"
            )
        return self._encode_for(x, role, queries)

    def uses_queries(self, role: Role) -> bool:
        """Whether ``encode(..., role)`` needs the queries (a query-aware transform)."""
        return False

    def _encode_for(self, x: torch.Tensor, role: Role, queries: torch.Tensor) -> Packed:
        raise NotImplementedError

    def decode(self, packed: Packed, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Decode every token: ``[..., T, d]`` in ``dtype`` (default: the encoded dtype)."""
        out = self._decode(packed)
        return out.to(dtype or packed.dtype)

    def decode_tokens(
        self, packed: Packed, index: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Decode only tokens ``index`` (1-D, along the token axis): ``[..., len(index), d]``."""
        index = torch.as_tensor(index, dtype=torch.long, device=next(iter(packed.tensors.values())).device)
        if index.dim() != 1:
            raise InputError("decode_tokens: index must be 1-D")
        t = packed.num_tokens
        if index.numel() and (int(index.min()) < -t or int(index.max()) >= t):
            raise InputError(f"decode_tokens: index out of range for {t} tokens")
        index = torch.where(index < 0, index + t, index)
        return self._decode_tokens(packed, index).to(dtype or packed.dtype)

    def roundtrip(self, x: torch.Tensor, role: Role = "key") -> tuple[torch.Tensor, Packed]:
        packed = self.encode(x, role)
        return self.decode(packed), packed

    def concat_tokens(self, packs: list[Packed]) -> Packed | None:
        """Join Packeds of consecutive tokens into one, or None where the layout forbids it.

        Why: a cache holds many small blocks; decoding each through Python costs more than the
        arithmetic. Joining the codes (a copy of a few bytes per token) lets one decode call
        serve a whole attention chunk. Only token-wise layouts qualify: a block carrying
        per-block state (a mean, fp16 sinks, KIVI's channel groups) returns None.
        """
        if not packs or not self.per_token:
            return None
        first = packs[0]
        lead, d = first.shape[:-2], first.shape[-1]
        for p in packs:
            if (
                p.role != first.role
                or p.shape[:-2] != lead
                or p.shape[-1] != d
                or not set(p.tensors) <= self.per_token
                or set(p.tensors) != set(first.tensors)
                or {k: v for k, v in p.meta.items() if k not in self.token_meta}
                != {k: v for k, v in first.meta.items() if k not in self.token_meta}
            ):
                return None
        if len(packs) == 1:
            return first
        axis = len(first.shape) - 2
        tensors = {n: torch.cat([p.tensors[n] for p in packs], dim=axis) for n in first.tensors}
        meta = dict(first.meta)
        for n in self.token_meta & set(meta):
            meta[n] = sum(p.meta[n] for p in packs)
        t = sum(p.shape[-2] for p in packs)
        return Packed(first.spec, first.role, (*lead, t, d), first.dtype, tensors, meta)

    def shared_nbytes(self, d: int) -> int:
        """Bytes held once per cache for head dim ``d`` (codebooks, rotations)."""
        return 0

    def validate(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{self.spec}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT:
            raise InputError(
                f"{self.spec}: dtype {x.dtype} not supported; valid: float16, bfloat16, float32, float64"
            )
        if x.device.type not in self.devices:
            raise InputError(
                f"{self.spec}: device {x.device.type!r} not supported; valid: {', '.join(self.devices)}"
            )
        if x.dim() < 2:
            raise InputError(f"{self.spec}: expected shape [..., T, d], got {tuple(x.shape)}")
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise InputError(f"{self.spec}: input contains NaN or inf; only finite values can be encoded")
        self.check_dim(x.shape[-1])

    # -- to implement -----------------------------------------------------------------------
    @abstractmethod
    def _encode(self, x: torch.Tensor, role: Role) -> Packed: ...

    @abstractmethod
    def _decode(self, packed: Packed) -> torch.Tensor: ...

    def _decode_tokens(self, packed: Packed, index: torch.Tensor) -> torch.Tensor:
        """Default random access for token-wise layouts: gather rows of every per-token tensor."""
        sub = Packed(
            packed.spec,
            packed.role,
            (*packed.shape[:-2], index.numel(), packed.shape[-1]),
            packed.dtype,
            {k: v.index_select(len(packed.shape) - 2, index) for k, v in packed.tensors.items()},
            dict(packed.meta),
        )
        return self._decode(sub)


CODECS: Registry[Codec] = Registry("codec")
register_codec = CODECS.register


def make_codec(spec: str) -> Codec:
    """Build a codec from its spec string, e.g. ``make_codec("kivi:b=2")``."""
    return CODECS.build(spec)
