"""Shared machinery of the rotation codecs (TurboQuant, FibQuant): normalize, rotate, block-quantize.

Per cached vector x ∈ R^d (codecs.md §1.3, §2.1): store s = ‖x‖ in fp16, rotate u = x/s with a
seeded Π, split y = Πu (zero-padded to a multiple of k if asked) into blocks of k coordinates
and store each block's nearest codeword index. Decoding gathers codewords: x̂ = s·Πᵀŷ.
Subclasses only say what the codebook is (and may add tensors, like TurboQuant's QJL sketch).

Beyond the papers, shared by both codecs: ``sinks``/``window`` keep the first/last tokens in
fp16 (attention sinks and the recent window matter most), ``center`` subtracts a stored per-head
key mean over tokens before normalizing (keys share a large common direction that otherwise
eats the rate; softmax ignores the q·μ shift it adds back), ``white=r`` codes keys through a
rank-r transform fitted to the queries that will read them (:mod:`.primitives.whiten`; encode
then needs ``queries=``), ``pca=r`` codes each key's coefficients along its head's top r
directions apart at ``pcabits`` bits (:mod:`.primitives.principal`), and separate key/value rates.

Packed layout (fixed; the attention kernels depend on it), for input ``[..., T, d]``:

- ``codes``: uint8 ``[..., Tc, row_bytes]``: the d/k block indices of each coded token, packed
  with ``pack_rows`` at log2 N bits (power-of-two N) or mixed radix (``meta["radix_width"] > 0``);
- ``norm``: fp16 ``[..., Tc]``: ‖x - mean‖, so x̂ = norm·Πᵀŷ (+ mean); with ``normbits=8``
  ``lnorm`` uint8 ``[..., Tc]`` instead (a 1/8-octave log2 code, :func:`encode_lnorm`);
- optional: ``mean`` fp32 ``[..., 1, d]`` (keys with ``center=1``; the mean of the coded tokens),
  ``sinks`` fp16 ``[..., S, d]`` and ``window`` fp16 ``[..., W, d]`` (present whenever the option
  is > 0, possibly with 0 rows), ``wu`` fp16 ``[..., r, d]`` and ``ws`` fp16 ``[..., r]`` (keys with
  ``white=r``: x is coded as A·x, A = I + wuᵀ diag(ws) wu, the mean and norm taken after A),
  ``pu`` fp16 ``[..., r, d]``, ``ps`` fp16 ``[..., r]`` and ``pc`` int8 ``[..., Tc, r]`` (keys with
  ``pca=r``: the coefficients along ``pu`` taken out after A and before the mean; ``r/2`` bytes
  per token at ``pcabits=4``),
  and TurboQuant's ``qjl``/``rnorm`` (see :mod:`.turboquant`).
  Token order is sinks, coded, window: T = S + Tc + W.
- ``meta``: ``k``, ``n`` (N), ``blocks`` (ceil(d/k)), ``pad`` (zeros appended to y), ``bits``
  (index width, 0 for mixed radix), ``radix_group``/``radix_width`` (0 unless mixed radix),
  ``sinks``, ``window``, ``coded`` (S, W, Tc).

Codebooks and Π are shared state: ``codec.codebook(d, role)`` ``[N, k]`` fp32 and
``codec.rotation(d)`` (``.matrix`` ``[d, d]`` fp32, y = Πx), counted by ``shared_nbytes(d)``.

Attention can stay in the rotated basis: ``rotate_query(q) @ decode_rotated(p).T`` equals
``q @ decode(p).T``, so a kernel rotates the query once instead of un-rotating every key.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch

from ..core.errors import InputError, SpecError
from .base import Codec, Packed, Role
from .primitives import principal, whiten
from .primitives.mixed_radix import index_row_bytes, pack_indices, radix_layout, unpack_indices
from .primitives.rotation import ROTATIONS, Rotation, make_rotation

__all__ = ["RotatedCodec", "check_common", "decode_lnorm", "encode_lnorm", "stored_norm"]

_FP16_MAX = 65504.0
_SCORE_BYTES = 4 << 20  # [rows, N] scores per encode chunk: cache-sized chunks ran 2x faster than 64 MB
# coded tensors with one row per coded token, selected together by _coded; pca's ``pc`` has one too
# but is read by _principal, and its block's ``pu``/``ps`` keep such a Packed from being joined
_PER_TOKEN = ("codes", "norm", "lnorm", "qjl", "rnorm")
# normbits=8: a norm n is stored as round(8·log2 n) + 128 in a uint8, i.e. 1/8-octave steps over
# 2^-15.9 .. 2^15.9 (about fp16's normal range): at most 4.4% relative error, about 2.6% RMS, which adds
# about 2% to the squared error of a 3-bit code and saves 8 bits a vector (0.125 bit/coordinate
# at d = 64, as much as a 5% higher compression ratio at 2.5 bits)
_LNORM_STEPS, _LNORM_ZERO = 8.0, 128


def encode_lnorm(norm: torch.Tensor) -> torch.Tensor:
    """uint8 log2 code of non-negative norms (0 and anything below about 2^-15.9 map to code 0)."""
    n = norm.to(torch.float32)
    c = torch.round(torch.log2(n.clamp_min(2.0**-17)) * _LNORM_STEPS) + _LNORM_ZERO
    tiny = 2.0 ** ((0.5 - _LNORM_ZERO) / _LNORM_STEPS)  # below code 1's rounding interval
    return torch.where(n < tiny, 0.0, c.clamp(1, 255)).to(torch.uint8)


def decode_lnorm(code: torch.Tensor) -> torch.Tensor:
    """float32 norms of :func:`encode_lnorm` codes (code 0 decodes to 0)."""
    n = torch.exp2((code.to(torch.float32) - _LNORM_ZERO) / _LNORM_STEPS)
    return torch.where(code == 0, torch.zeros_like(n), n)


def stored_norm(tz: dict[str, torch.Tensor]) -> torch.Tensor:
    """The coded tokens' norms as float32, from ``norm`` (fp16) or ``lnorm`` (uint8 log code)."""
    if "lnorm" in tz:
        return decode_lnorm(tz["lnorm"])
    return tz["norm"].to(torch.float32)


def check_common(cfg: Any) -> None:
    """Validate the options every rotation codec has (one-line SpecErrors naming valid values)."""
    if cfg.rot not in ROTATIONS:
        raise SpecError(f"{cfg.name}: rot must be one of {', '.join(ROTATIONS)}, got {cfg.rot!r}")
    if cfg.seed < 0:
        raise SpecError(f"{cfg.name}: seed must be >= 0, got {cfg.seed}")
    for opt in ("sinks", "window"):
        if getattr(cfg, opt) < 0:
            raise SpecError(f"{cfg.name}: {opt} must be >= 0 tokens, got {getattr(cfg, opt)}")
    if not 0 <= cfg.white <= 1024:
        raise SpecError(
            f"{cfg.name}: white (rank of the query-aware key transform) must be in 0..1024, got {cfg.white}"
        )
    if not 0.0 < cfg.wshrink <= 10.0:
        raise SpecError(f"{cfg.name}: wshrink must be in (0, 10], got {cfg.wshrink:g}")
    if not 0 <= getattr(cfg, "pca", 0) <= 64:
        raise SpecError(f"{cfg.name}: pca (key directions coded apart) must be in 0..64, got {cfg.pca}")
    if getattr(cfg, "pcabits", 8) not in principal.BITS:
        raise SpecError(
            f"{cfg.name}: pcabits must be one of {', '.join(map(str, principal.BITS))}, got {cfg.pcabits}"
        )
    if cfg.normbits not in (8, 16):
        raise SpecError(
            f"{cfg.name}: normbits must be 16 (fp16 norms) or 8 (log-coded norms), got {cfg.normbits}"
        )


class RotatedCodec(Codec):
    """Base of normalize–rotate–block-quantize codecs; see the module docstring for the layout."""

    config: Any  # a frozen config with seed, rot, center, sinks, window (+ subclass fields)
    # sinks/window/mean are per block, so a Packed holding them is never joined
    per_token = frozenset(_PER_TOKEN)
    token_meta = frozenset({"coded"})

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._dev: dict[tuple[Any, ...], torch.Tensor] = {}
        self._trees: dict[tuple[Any, ...], Any] = {}

    # -- what subclasses define ----------------------------------------------------------------
    @property
    @abstractmethod
    def k(self) -> int:
        """Block size (coordinates per codeword)."""

    @abstractmethod
    def levels(self, role: Role) -> int:
        """Codebook size N for ``role``."""

    @abstractmethod
    def _build_codebook(self, d: int, role: Role) -> torch.Tensor:
        """``[N, k]`` float32 CPU codebook for head dim ``d`` (k=1: sorted)."""

    @property
    def extra_bits(self) -> int:
        """Bits per coordinate stored beside the block indices (TurboQuant's QJL sign)."""
        return 0

    def pads(self) -> bool:
        """Whether a head dim not divisible by k is zero-padded (else rejected)."""
        return False

    def _extra_encode(self, y: torch.Tensor, yhat: torch.Tensor, role: Role) -> dict[str, torch.Tensor]:
        """Extra per-token tensors from unit rotated ``y`` and its quantization ``yhat``."""
        return {}

    def _extra_decode(self, tz: dict[str, torch.Tensor], yhat: torch.Tensor, role: Role) -> torch.Tensor:
        return yhat

    def _extra_shared_nbytes(self, d: int) -> int:
        return 0

    # -- shared state ----------------------------------------------------------------------------
    def rotation(self, d: int) -> Rotation:
        """The shared rotation Π for head dim ``d``."""
        return make_rotation(self.config.rot, d, self.config.seed)

    def codebook(self, d: int, role: Role = "key", device: torch.device | str = "cpu") -> torch.Tensor:
        """The ``[N, k]`` float32 codebook used for ``role`` at head dim ``d`` (treat as read-only)."""
        key = ("book", d, self.levels(role))
        return self._on(key, torch.device(device), lambda: self._build_codebook(d, role))

    def shared_nbytes(self, d: int) -> int:
        """Rotation + one codebook per distinct rate (+ subclass state), held once per cache."""
        books = {self.levels(r): self.levels(r) * self.k * 4 for r in ("key", "value")}
        return self.rotation(d).nbytes + sum(books.values()) + self._extra_shared_nbytes(d)

    def _on(self, key: tuple[Any, ...], device: torch.device, make: Any) -> torch.Tensor:
        """Memoize a derived tensor per device (built on the CPU, then moved)."""
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        cpu = (*key, "cpu")
        if cpu not in self._dev:
            self._dev[cpu] = make()
        full = (*key, str(device))
        if full not in self._dev:
            self._dev[full] = self._dev[cpu].to(device)
        return self._dev[full]

    # -- geometry --------------------------------------------------------------------------------
    def blocks(self, d: int) -> int:
        """Blocks per vector: ceil(d / k) (exactly d/k unless padding)."""
        return -(-d // self.k)

    def row_bytes(self, d: int, role: Role = "key") -> int:
        """Bytes of ``codes`` per coded token."""
        return index_row_bytes(self.blocks(d), self.levels(role))

    def rate_bits(self, role: Role = "key") -> float:
        """Nominal bits per coordinate: log2(N)/k (+ extra bits), without norm or padding."""
        return math.log2(self.levels(role)) / self.k + self.extra_bits

    def check_dim(self, d: int) -> None:
        k = self.k
        if d < 2 or (k > 1 and d <= k):
            raise InputError(f"{self.spec}: head dim {d} must exceed the block size k={k} (and be >= 2)")
        if d % k and not self.pads():
            valid = [j for j in (1, 2, 3, 4, 6, 8) if d % j == 0 and d > j]
            raise InputError(
                f"{self.spec}: k={k} does not divide head dim {d}; valid k for d={d}: "
                f"{', '.join(map(str, valid))} (or pad=1)"
            )
        if self.config.rot == "hadamard" and d & (d - 1):
            raise InputError(
                f"{self.spec}: rot=hadamard needs a power-of-two head dim, got {d}; use rot=haar"
            )

    # -- block quantization in the rotated basis -------------------------------------------------
    def quantize(self, y: torch.Tensor, d: int, role: Role = "key") -> torch.Tensor:
        """Nearest-codeword indices ``[..., D/k]`` of rotated vectors ``y`` ``[..., D]`` (D = padded d).

        On the CPU, codebooks of 64+ vectors are searched with an exact k-d tree (float64): the
        matmul scan is memory-bound on its ``[rows, N]`` score matrix, and the tree was 8-78x
        faster with identical indices on 200k random blocks (N = 256..4096). The scan stays as
        :meth:`quantize_reference`, the fast path's oracle in the tests and the GPU path.
        """
        k, book = self.k, self.codebook(d, role, y.device)
        if k > 1 and y.device.type == "cpu" and book.shape[0] >= 64:
            tree = self._tree(d, role)
            flat = y.reshape(-1, k).to(torch.float64).numpy()
            _, idx = tree.query(flat, workers=-1)
            return torch.from_numpy(idx).reshape(*y.shape[:-1], y.shape[-1] // k)
        return self.quantize_reference(y, d, role)

    def _tree(self, d: int, role: Role):
        key = ("tree", d, role)
        tree = self._trees.get(key)
        if tree is None:
            from scipy.spatial import cKDTree

            tree = self._trees[key] = cKDTree(self.codebook(d, role).double().numpy())
        return tree

    def quantize_reference(self, y: torch.Tensor, d: int, role: Role = "key") -> torch.Tensor:
        """Plain nearest-codeword search: bisection for scalars, chunked matmul scan for blocks."""
        k, book = self.k, self.codebook(d, role, y.device)
        flat = y.reshape(-1, k).to(torch.float32)
        if k == 1:  # sorted scalar levels: nearest = bisection on the midpoints
            mid = (book[1:, 0] + book[:-1, 0]) / 2
            idx = torch.searchsorted(mid, flat[:, 0].contiguous())
        else:  # argmin ‖y-c‖² = argmax 2⟨y,c⟩ - ‖c‖² (codewords differ in norm), chunked
            neg = -(book * book).sum(1)
            idx = torch.empty(flat.shape[0], dtype=torch.int64, device=y.device)
            step = max(1, _SCORE_BYTES // (4 * book.shape[0]))
            for s in range(0, flat.shape[0], step):
                idx[s : s + step] = torch.addmm(neg, flat[s : s + step], book.T, alpha=2.0).argmax(1)
        return idx.reshape(*y.shape[:-1], y.shape[-1] // k)

    def dequantize(self, idx: torch.Tensor, d: int, role: Role = "key") -> torch.Tensor:
        """Codewords of ``idx`` ``[..., D/k]`` concatenated: ``[..., D]`` float32."""
        book = self.codebook(d, role, idx.device)
        # torch's dedicated gathers beat advanced indexing on CPU (measured 3-4x): embedding for
        # rows of k > 1, take for scalar codebooks
        if self.k == 1:
            return torch.take(book.reshape(-1), idx)
        return torch.nn.functional.embedding(idx, book).reshape(*idx.shape[:-1], idx.shape[-1] * self.k)

    # -- encode ----------------------------------------------------------------------------------
    def uses_queries(self, role: Role) -> bool:
        return role == "key" and getattr(self.config, "white", 0) > 0

    def _encode_for(self, x: torch.Tensor, role: Role, queries: torch.Tensor) -> Packed:
        return self._encode(x, role, queries)

    def _encode(self, x: torch.Tensor, role: Role, queries: torch.Tensor | None = None) -> Packed:
        c = self.config
        *lead, t, d = x.shape
        s = min(c.sinks, t)
        w = min(c.window, t - s)
        tc = t - s - w
        shape, dtype = tuple(x.shape), x.dtype
        x = x.to(torch.float32)
        r = x[..., s : s + tc, :]
        tensors: dict[str, torch.Tensor] = {}
        if queries is not None:  # code A·k (primitives.whiten); the transform is stored and counted
            u, sv = whiten.fit(queries, r if tc else x, c.white, c.wshrink)
            tensors["wu"], tensors["ws"] = u, sv
            r = whiten.apply(whiten.matrix(u, sv), r)
        if getattr(c, "pca", 0) and role == "key":  # top directions apart (primitives.principal)
            if c.pca >= d:
                raise InputError(f"{self.spec}: pca={c.pca} must be below the head dim {d}")
            pu = principal.fit(r if tc else x, c.pca)
            r, tensors["ps"], tensors["pc"] = principal.split(r, pu, c.pcabits)
            tensors["pu"] = pu
        mean = None
        if c.center and role == "key":
            mean = r.mean(dim=-2, keepdim=True) if tc else torch.zeros(*lead, 1, d, device=x.device)
            r = r - mean
        norm = r.norm(dim=-1)
        limit = _FP16_MAX if c.normbits == 16 else 2.0 ** ((255 - _LNORM_ZERO + 0.5) / _LNORM_STEPS)
        if tc and float(norm.max()) > limit:
            raise InputError(
                f"{self.spec}: a vector norm ({float(norm.max()):.4g}) exceeds the "
                f"{'fp16' if c.normbits == 16 else '8-bit log-coded'} range of the stored norm (max {limit:.4g})"
            )
        u = r / norm.clamp_min(1e-30).unsqueeze(-1)
        y = self.rotation(d).apply(u)
        pad = self.blocks(d) * self.k - d
        if pad:
            y = torch.nn.functional.pad(y, (0, pad))
        idx = self.quantize(y, d, role)
        n = self.levels(role)
        tensors["codes"] = pack_indices(idx, n)
        if c.normbits == 8:
            tensors["lnorm"] = encode_lnorm(norm)
        else:
            tensors["norm"] = norm.to(torch.float16)
        tensors.update(self._extra_encode(y, self.dequantize(idx, d, role), role))
        if mean is not None:
            tensors["mean"] = mean.contiguous()
        if c.sinks:
            tensors["sinks"] = x[..., :s, :].to(torch.float16).contiguous()
        if c.window:
            tensors["window"] = x[..., s + tc :, :].to(torch.float16).contiguous()
        bits = n.bit_length() - 1 if n & (n - 1) == 0 else 0
        lay = None if bits else radix_layout(self.blocks(d), n)
        meta = {
            "k": self.k,
            "n": n,
            "blocks": self.blocks(d),
            "pad": pad,
            "bits": bits,
            "radix_group": lay.group if lay else 0,
            "radix_width": lay.width if lay else 0,
            "sinks": s,
            "window": w,
            "coded": tc,
        }
        return Packed(self.spec, role, shape, dtype, tensors, meta)

    # -- decode ----------------------------------------------------------------------------------
    def _coded(self, packed: Packed, rows: torch.Tensor | None) -> torch.Tensor:
        """ŷ·‖x‖ of coded rows (all if None) in the rotated basis, ``[..., R, d]`` float32."""
        d, axis = packed.shape[-1], len(packed.shape) - 2
        tz = {n: v for n, v in packed.tensors.items() if n in _PER_TOKEN}
        if rows is not None:
            tz = {n: v.index_select(axis, rows) for n, v in tz.items()}
        idx = unpack_indices(tz["codes"], self.levels(packed.role), self.blocks(d))
        yhat = self._extra_decode(tz, self.dequantize(idx, d, packed.role), packed.role)
        return yhat[..., :d] * stored_norm(tz).unsqueeze(-1)

    def _assemble(self, packed: Packed, index: torch.Tensor | None, rotated: bool) -> torch.Tensor:
        """Tokens ``index`` (all if None) in the original or the rotated basis, float32."""
        *lead, t, d = packed.shape
        s, tc = packed.meta["sinks"], packed.meta["coded"]
        tz, rot = packed.tensors, self.rotation(d)
        device = tz["codes"].device
        if index is None:
            index = torch.arange(t, device=device)
            rows: torch.Tensor | None = None
        else:
            rows = index
        white = None
        if "wu" in tz:
            if rotated:
                raise InputError(
                    f"{packed.spec}: keys coded with white= decode in the original basis only (decode, not decode_rotated)"
                )
            white = whiten.inverse(tz["wu"], tz["ws"])
        if rows is None and s == 0 and tc == t:  # all tokens coded (the cache's blocks): no scatter
            y = self._coded(packed, None)
            mean = tz.get("mean")
            if rotated:
                y = y if mean is None else y + rot.apply(mean)
                return self._principal(packed, y, None, rot)
            y = rot.apply_t(y, exact=True)
            y = y if mean is None else y + mean
            y = self._principal(packed, y, None)
            return y if white is None else whiten.apply(white, y)
        is_sink, is_win = index < s, index >= s + tc
        is_code = ~(is_sink | is_win)
        out = torch.empty(*lead, index.numel(), d, device=device)
        if bool(is_code.any()):
            y = self._coded(packed, None if rows is None else index[is_code] - s)
            mean = tz.get("mean")
            if rotated:
                y = y if mean is None else y + rot.apply(mean)
                y = self._principal(packed, y, None if rows is None else index[is_code] - s, rot)
            else:
                y = rot.apply_t(y, exact=True)  # bitwise the same for any subset of rows
                y = y if mean is None else y + mean
                y = self._principal(packed, y, None if rows is None else index[is_code] - s)
                y = y if white is None else whiten.apply(white, y)
            out[..., is_code, :] = y
        for name, mask, start in (("sinks", is_sink, 0), ("window", is_win, s + tc)):
            if bool(mask.any()):
                v = tz[name].index_select(len(lead), index[mask] - start).to(torch.float32)
                out[..., mask, :] = rot.apply(v) if rotated else v
        return out

    def _principal(
        self, packed: Packed, y: torch.Tensor, rows: torch.Tensor | None, rot: Rotation | None = None
    ) -> torch.Tensor:
        """``y`` plus the coded rows' part along the stored key directions (``pca=``), if any
        (rotated by ``rot`` for a decode in the rotated basis)."""
        tz = packed.tensors
        if "pu" not in tz:
            return y
        pc = tz["pc"] if rows is None else tz["pc"].index_select(len(packed.shape) - 2, rows)
        part = principal.decode(tz["pu"], tz["ps"], pc, self.config.pcabits)
        return y + (part if rot is None else rot.apply(part))

    def _decode(self, packed: Packed) -> torch.Tensor:
        return self._assemble(packed, None, rotated=False)

    def _decode_tokens(self, packed: Packed, index: torch.Tensor) -> torch.Tensor:
        return self._assemble(packed, index, rotated=False)

    def decode_rotated(self, packed: Packed) -> torch.Tensor:
        """All tokens in the rotated basis (Π x̂, no Πᵀ applied to coded tokens), float32 ``[..., T, d]``."""
        return self._assemble(packed, None, rotated=True)

    def rotate_query(self, q: torch.Tensor) -> torch.Tensor:
        """Πq (float32), so that ``rotate_query(q) @ decode_rotated(p).T == q @ decode(p).T``."""
        return self.rotation(q.shape[-1]).apply(q)
