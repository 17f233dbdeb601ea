"""A layer's packed blocks in one contiguous store, so a decode step is one kernel launch.

The reference read path (:mod:`.attention`) decodes blocks chunk by chunk, a dozen small ops per
chunk and layer: on a GPU a decode step is launch-bound long before it is bandwidth-bound. The
kernels of :mod:`kvshrink.kernels` read a packed cache as one ``[B, Hkv, T, ...]`` tensor per
packed field, so this store keeps a layer's blocks there, appended as the window flushes
(encoded in one fused call for rotation codecs), and every packed :class:`Segment`'s ``Packed``
rows are *views* of it. The bytes are held once, and every other path (prompt reads, beams,
the memory report) sees the same blocks as before.

A layer gets a store only when the kernel can serve all of it: no token policy (no
observation, eviction, pages or low-precision runs), not a sliding-window layer, a codec the
kernels have a layout for. On the CPU the kernel is the compiled table scan of
:mod:`kvshrink.kernels.decode_attn.cpu`, for rotation codecs (TurboQuant, FibQuant) only; int4
and KIVI keep the PyTorch path there. A step then takes the kernel when it has one query token and no
empty slot (left padding flushes blocks with empty slots: the store stops there and the layer
reads through the reference path from then on, on the same data).
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import replace

import torch

from ..codecs import Codec, Packed
from ..codecs.base import Role
from ..core.errors import InputError, KvshrinkError
from ..kernels.layout import layout_of, packed_unsupported
from ..policies import Policy
from .config import CacheConfig
from .segment import Segment, held_pos

__all__ = ["KERNEL_MODES", "PackedStore", "kernel_unsupported", "make_store"]

KERNEL_MODES = ("auto", "triton", "torch")
_ROLES: tuple[Role, Role] = ("key", "value")


def kernel_unsupported(codec: Codec, d: int, block: int, dtype: torch.dtype) -> str | None:
    """Why the decode kernel cannot read ``codec``'s blocks of ``block`` tokens (None: it can)."""
    try:
        for role in _ROLES:
            tpl = _template(codec, role, d, block, dtype)
            why = packed_unsupported(tpl, layout_of(codec, role, d), d)
            if why:
                return why
            for name, t in sorted(tpl.tensors.items(), key=lambda kv: kv[0] != "residual"):
                if name == "residual":  # KIVI's fp16 tail: empty when the block is whole groups
                    if t.numel():
                        return f"{t.shape[1]} of every {block}-token block stay in KIVI's fp16 residual"
                elif t.shape[1] == 0 or block % t.shape[1]:
                    return f"packed field {name!r} does not split into whole rows per block of {block}"
    except KvshrinkError as e:
        return str(e)
    return None


_TEMPLATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _template(codec: Codec, role: Role, d: int, block: int, dtype: torch.dtype) -> Packed:
    """What the codec stores for one block of one KV head (seeded data: only shapes matter).

    Memoized per codec: every layer of a cache shares one codec, and both the eligibility check
    and the store ask for it. Read-only: nothing writes into a template's tensors."""
    per = _TEMPLATES.setdefault(codec, {})
    key = (role, d, block, dtype)
    if key not in per:
        g = torch.Generator().manual_seed(0)
        per[key] = codec.encode(torch.randn(1, block, d, generator=g).to(dtype), role)
    return per[key]


def make_store(
    config: CacheConfig, codec: Codec, policy: Policy | None, sliding: bool, k: torch.Tensor, v: torch.Tensor
) -> PackedStore | None:
    """A store for a layer whose decode steps the Triton kernel can serve (first keys/values
    ``k``/``v`` ``[B, Hkv, T, D]``), else None; ``kernels=triton`` raises instead of None."""
    mode = config.kernels
    if mode == "torch" or sliding:
        return None  # sliding layers drop blocks from the front: the reference path reads them
    if config.sinks:
        if mode == "triton":
            raise InputError(
                "cache:kernels=triton cannot read cache:sinks (exact first tokens held beside the "
                "packed blocks); use sinks=0, or kernels=auto to read them through PyTorch"
            )
        return None
    if mode == "auto" and not k.is_cuda:  # CPU: the compiled table scan, for rotation codecs
        if policy is not None or k.shape[-1] != v.shape[-1] or not _cpu_kernel(codec, k.shape[-1]):
            return None
        if kernel_unsupported(codec, k.shape[-1], config.block, k.dtype) is not None:
            return None
        b, h, _, d = k.shape
        return PackedStore(codec, b, h, d, config.block, k.device, k.dtype)
    if mode == "auto":
        from ..kernels.decode_attn import triton_available

        if not triton_available():
            return None
    if mode == "triton" and not k.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise InputError(
            "cache:kernels=triton on a CPU model needs TRITON_INTERPRET=1 (the Triton interpreter); "
            "use kernels=auto (Triton on CUDA, PyTorch elsewhere) or kernels=torch"
        )
    if policy is not None:
        why: str | None = f"token policy {policy.config.name} reads through the PyTorch path"
    elif k.shape[-1] != v.shape[-1]:
        why = f"key dim {k.shape[-1]} != value dim {v.shape[-1]}"
    else:
        why = kernel_unsupported(codec, k.shape[-1], config.block, k.dtype)
    if why is not None:
        if mode == "triton":
            raise InputError(
                f"cache:kernels=triton cannot serve this cache: {why}; use kernels=auto or torch"
            )
        return None
    b, h, _, d = k.shape
    return PackedStore(codec, b, h, d, config.block, k.device, k.dtype, mode == "triton")


def _cpu_kernel(codec: Codec, d: int) -> bool:
    """The CPU decode kernel (numba) can read both roles of ``codec`` (rotation codecs)."""
    from ..kernels.lut_cpu import available

    try:
        return available() and all(layout_of(codec, r, d).kind == "vq" for r in _ROLES)
    except KvshrinkError:
        return False


class PackedStore:
    """Contiguous packed fields ``[B, Hkv, capacity / per, ...]`` of one layer's blocks.

    ``per[role][field]``: tokens per stored row of a field (1 for per-token codes and norms,
    KIVI's group for its per-channel key scales). Capacity grows by a 32nd (at least a block)
    and the unused tail is reported as held (:meth:`slack_nbytes`).
    """

    def __init__(
        self, codec: Codec, batch: int, heads: int, d: int, block: int, device, dtype, force: bool = False
    ) -> None:
        self.codec, self.batch, self.heads, self.d, self.block = codec, batch, heads, d, block
        self.force = force  # Triton even on CPU tensors (the interpreter: how CI tests this path)
        self.device, self.dtype = torch.device(device), dtype
        self.n = 0  # tokens stored per row
        self.cap = 0
        self.tpl = {r: _template(codec, r, d, block, dtype) for r in _ROLES}
        self.per = {
            r: {k: block // t.shape[1] for k, t in self.tpl[r].tensors.items() if t.numel()} for r in _ROLES
        }
        self.fields: dict[Role, dict[str, torch.Tensor]] = {r: {} for r in _ROLES}
        self.empty = {  # fields a block leaves empty (KIVI's residual), shaped as the codec's own
            r: {
                k: t.new_zeros((heads, *t.shape[1:])).to(self.device)
                for k, t in self.tpl[r].tensors.items()
                if not t.numel()
            }
            for r in _ROLES
        }
        self.vq = layout_of(codec, "key", d).kind == "vq" and layout_of(codec, "value", d).kind == "vq"
        self._len: dict[tuple[int, int], torch.Tensor] = {}

    # -- writing -----------------------------------------------------------------------------
    def append(self, pieces: list[Segment], blocks: list[Segment]) -> list[Segment]:
        """Pack consecutive full dense ``pieces`` (one block each) into the store; returns them
        as packed segments whose rows view the store. ``blocks``: the layer's packed blocks,
        re-pointed if the store has to move."""
        t = sum(p.size for p in pieces)
        if self.n + t > self.cap:
            self._grow(self.n + t, blocks)
        k = torch.cat([p.k for p in pieces], dim=2) if len(pieces) > 1 else pieces[0].k
        v = torch.cat([p.v for p in pieces], dim=2) if len(pieces) > 1 else pieces[0].v
        for role, x in zip(_ROLES, (k, v)):
            self._write(role, x, self.n)  # type: ignore[arg-type]
        out, a = [], self.n
        for p in pieces:
            keys, values = self._views(a, a + p.size)
            pos = held_pos(p)
            out.append(replace(p, pos=pos, acc=None, keys=keys, values=values, k=None, v=None))
            a += p.size
        self.n += t
        return out

    def _write(self, role: Role, x: torch.Tensor, start: int) -> None:
        """Encode ``x`` ``[B, Hkv, T, d]`` into rows ``[start, start + T)``."""
        fields = self.fields[role]
        if self.vq and (x.is_cuda or self.force):  # fused rotate + nearest codeword + pack, in place
            from ..kernels.encode import encode_vq

            at = torch.full((self.batch,), start, dtype=torch.int32, device=x.device)
            backend = "triton" if self.force else "auto"
            encode_vq(x, self.codec, role, out=(fields["codes"], fields["norm"]), start=at, backend=backend)
            return
        b, h, t, d = x.shape
        packed = self.codec.encode(x.reshape(b * h, t, d), role)  # leading dims are independent
        for name, buf in fields.items():
            per = self.per[role][name]
            src = packed.tensors[name]
            buf[:, :, start // per : (start + t) // per].copy_(src.reshape(b, h, *src.shape[1:]))

    def _grow(self, need: int, blocks: list[Segment]) -> None:
        # the first allocation (the prompt) is exact; later ones add a 32nd (at least a block):
        # at most ~3% held unused, and a copy of the store every 32nd of its size in tokens
        step = max(self.block, self.cap // 32) if self.cap else 0
        cap = max(need, self.cap + step)
        cap = math.ceil(cap / self.block) * self.block
        for role in _ROLES:
            for name, t in self.tpl[role].tensors.items():
                if not t.numel():
                    continue
                per = self.per[role][name]
                buf = torch.zeros(
                    self.batch, self.heads, cap // per, *t.shape[2:], dtype=t.dtype, device=self.device
                )
                old = self.fields[role].get(name)
                if old is not None:
                    buf[:, :, : old.shape[2]].copy_(old)
                self.fields[role][name] = buf
        self.cap = cap
        self._review(blocks)

    # -- views -------------------------------------------------------------------------------
    def _views(self, a: int, z: int) -> tuple[list[Packed], list[Packed]]:
        """Per batch row, ``Packed`` keys and values of tokens ``[a, z)`` as views of the store."""
        out = []
        for role in _ROLES:
            tpl, rows = self.tpl[role], []
            meta = {**tpl.meta, **{m: z - a for m in self.codec.token_meta if m in tpl.meta}}
            for r in range(self.batch):
                tensors = {}
                for name, t in tpl.tensors.items():
                    if not t.numel():  # e.g. KIVI's empty residual: shared as is
                        tensors[name] = self.empty[role][name]
                        continue
                    per = self.per[role][name]
                    tensors[name] = self.fields[role][name][r, :, a // per : z // per]
                rows.append(Packed(tpl.spec, role, (self.heads, z - a, self.d), self.dtype, tensors, meta))
            out.append(rows)
        return out[0], out[1]

    def _review(self, blocks: list[Segment]) -> None:
        a = 0
        for seg in blocks:
            seg.keys, seg.values = self._views(a, a + seg.size)
            a += seg.size
        assert a == self.n, "the store and the layer's blocks disagree"

    def index_rows(self, idx: torch.Tensor, blocks: list[Segment]) -> None:
        """Keep batch rows ``idx`` (beam reorder, selection, repetition): rows are copied."""
        for role in _ROLES:
            for name, buf in self.fields[role].items():
                self.fields[role][name] = buf.index_select(0, idx.to(buf.device))
        self.batch = idx.numel()
        self._len.clear()
        self._review(blocks)

    # -- reading -----------------------------------------------------------------------------
    def attend(
        self,
        query: torch.Tensor,
        scaling: float,
        window: tuple[torch.Tensor, torch.Tensor] | None,
        held_back: int = 0,
    ) -> torch.Tensor:
        """Decode attention of ``query`` ``[B, H, 1, D]`` over the store plus the full-precision
        window ``(k, v)`` ``[B, Hkv, W, D]`` (the new token included). ``held_back``: the newest
        stored tokens left unread (the window passes them exact). Returns ``[B, 1, H, D]``."""
        from ..kernels.decode_attn import Window, decode_attention

        b = query.shape[0]
        packed = [
            Packed(
                self.tpl[r].spec,
                r,
                (self.heads, self.cap, self.d),
                self.dtype,
                self._full(r),
                self.tpl[r].meta,
            )
            for r in _ROLES
        ]
        on_gpu = self.force or self.device.type == "cuda"  # else the CPU kernel, in the window's dtype
        win = None
        if window is not None:
            wk, wv = window
            if on_gpu:
                wk, wv = wk.to(torch.float16), wv.to(torch.float16)
            win = Window(wk, wv, self._lengths(b, wk.shape[2]))
        out = decode_attention(
            query[:, :, 0],
            packed[0],
            packed[1],
            self._lengths(b, self.n - held_back),
            win,
            codec=self.codec,
            scale=scaling,
            backend="triton" if on_gpu else "cpu",  # validated when the store was made (make_store)
        )
        return out.unsqueeze(1)

    def _full(self, role: Role) -> dict[str, torch.Tensor]:
        return {**self.fields[role], **self.empty[role]}

    def _lengths(self, b: int, n: int) -> torch.Tensor:
        """``[B]`` int32 on the device, cached: no host-to-device copy per step and layer."""
        key = (b, n)
        if key not in self._len:
            if len(self._len) > 64:
                self._len.clear()
            self._len[key] = torch.full((b,), n, dtype=torch.int32, device=self.device)
        return self._len[key]

    def slack_nbytes(self) -> int:
        """Bytes allocated past the stored tokens (held, though no block uses them yet)."""
        total = sum(t.numel() * t.element_size() for f in self.fields.values() for t in f.values())
        used = sum(
            t.numel() * t.element_size() * self.n // max(self.cap, 1)
            for f in self.fields.values()
            for t in f.values()
        )
        return total - used
