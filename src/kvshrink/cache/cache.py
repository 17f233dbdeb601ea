"""``CompressedCache``: a transformers ``Cache`` that stores packed blocks and reads them packed.

    cache = CompressedCache(model, "snapkv:ratio=0.75+int4")
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
    cache.memory_report()   # bytes actually held, per layer, vs the fp16 DynamicCache equivalent

Each layer keeps the newest ``window`` tokens in full precision and packs older ones
``block`` at a time with the spec's codec; the ``kvshrink`` attention function (installed on
the model by the constructor, see :mod:`~kvshrink.cache.install`) decodes packed blocks chunk
by chunk inside an online softmax, so ``update`` never returns the dense history. An optional
policy (StreamingLLM, SnapKV, H2O, RazorAttention, ...) evicts per KV head before tokens are
packed or, later, empties packed slots that compaction gives back; a precision policy (MiKV,
ZipCache) moves tokens to runs packed with its low codec instead; a page policy (Quest,
ArkVale) picks the packed pages each later forward reads, and ArkVale keeps only a budget of
them resident, the rest in a host backup (``memory_report()`` counts ``resident`` and
``total`` bytes).

``get_seq_length()`` counts every token the sequence has seen, evicted ones included, so
``generate`` keeps assigning true position ids and cache positions however few tokens a layer
holds. Reusable across ``generate`` calls with the same batch, reorderable for beam search,
deep-copyable (codec, policy and model config are shared, tensors copied).
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache

from ..codecs import Codec
from ..codecs.plan import shared_parts
from ..core.errors import ModelError
from .config import CacheSpec, parse_cache_spec
from .heads import bind_heads
from .install import ATTENTION, announce, install, layer_windows, uninstall
from .layer import CompressedLayer
from .segment import column_bytes, shares_columns

__all__ = ["CompressedCache", "LayerBytes", "MemoryReport"]


@dataclass(frozen=True)
class LayerBytes:
    """Bytes one layer holds. ``baseline_tokens``: what ``DynamicCache`` would hold (all seen
    tokens, or the last ``sliding_window - 1`` on a sliding layer); ``fp16``: those in fp16.

    ``packed``/``window``/``bookkeeping`` (page digests included) are resident: what attention
    keeps on its device. ``backup``: packed pages held off it (ArkVale's host store), counted in
    ``total`` only. ``live``: tokens per KV head held anywhere; ``resident_live``: of those, the
    ones attention can read without a recall."""

    layer: int
    sliding_window: int | None
    seen: int
    slots: int
    live: float
    packed: int
    window: int
    bookkeeping: int
    baseline_tokens: int
    fp16: int
    backup: int = 0
    resident_live: float | None = None

    def __post_init__(self) -> None:
        if self.resident_live is None:
            object.__setattr__(self, "resident_live", self.live)

    @property
    def resident(self) -> int:
        return self.packed + self.window + self.bookkeeping

    @property
    def total(self) -> int:
        return self.resident + self.backup


@dataclass(frozen=True)
class MemoryReport:
    """Bytes of a cache: every packed tensor, window and bookkeeping tensor, and the codec's
    shared state once; rows that beams share are counted once. ``resident``: what attention keeps
    on its device; ``total`` (= ``nbytes``): everything held anywhere, a host backup included."""

    spec: str
    layers: tuple[LayerBytes, ...]
    shared: int

    @property
    def resident(self) -> int:
        return self.shared + sum(layer.resident for layer in self.layers)

    @property
    def total(self) -> int:
        return self.shared + sum(layer.total for layer in self.layers)

    @property
    def nbytes(self) -> int:
        return self.total

    @property
    def fp16(self) -> int:
        return sum(layer.fp16 for layer in self.layers)

    @property
    def ratio(self) -> float:
        """fp16-equivalent bytes over bytes held anywhere (higher is smaller)."""
        return self.fp16 / max(self.nbytes, 1)

    @property
    def resident_ratio(self) -> float:
        """fp16-equivalent bytes over resident bytes."""
        return self.fp16 / max(self.resident, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "nbytes": self.nbytes,
            "resident": self.resident,
            "total": self.total,
            "fp16": self.fp16,
            "ratio": self.ratio,
            "resident_ratio": self.resident_ratio,
            "shared": self.shared,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def __str__(self) -> str:
        rows = [
            f"{self.spec}: {self.nbytes} B held ({self.resident} B resident), {self.fp16} B fp16-equivalent "
            f"({self.ratio:.2f}x, {self.resident_ratio:.2f}x resident)"
        ]
        rows.append("layer  seen  slots    packed    window  bookkeep    backup      fp16")
        for b in self.layers:
            rows.append(
                f"{b.layer:5d} {b.seen:5d} {b.slots:6d} {b.packed:9d} {b.window:9d} {b.bookkeeping:9d} "
                f"{b.backup:9d} {b.fp16:9d}"
            )
        return "\n".join(rows)


class CompressedCache(Cache):
    """A ``Cache`` of :class:`~kvshrink.cache.layer.CompressedLayer`, one per decoder layer.

    ``model``: a supported causal LM (see ``docs/support-matrix.md``); its attention is switched
    to ``kvshrink`` (:meth:`uninstall` restores it). ``spec``: ``[POLICY+]CODEC[+cache:...]``,
    see :mod:`~kvshrink.cache.config`; ``cache_options`` (``window=64``) override the cache stage.
    """

    def __init__(self, model: torch.nn.Module, spec: str = "int4", **cache_options: Any) -> None:
        parsed = parse_cache_spec(spec, **cache_options)
        config = install(model)
        windows = layer_windows(config)
        codecs = parsed.build_layer_codecs(len(windows))
        low_codec = parsed.build_low_codec()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        for c in (*dict.fromkeys(codecs), low_codec):
            if c is not None:
                c.check_dim(head_dim)
        policy = parsed.build_policy()
        bind_heads(policy, model)
        white = parsed.key_transforms(len(windows))
        layers = [
            CompressedLayer(
                i,
                codecs[i],
                policy if window is None else None,
                parsed.cache,
                window,
                n_layers=len(windows),
                low_codec=low_codec,
                white=white[i],
            )
            for i, window in enumerate(windows)
        ]
        super().__init__(layers=layers)  # type: ignore[arg-type]
        self.parsed: CacheSpec = parsed
        self.codec = codecs[0] if parsed.plan is None else parsed.build_codec()  # the base codec
        self.codecs: tuple[Codec, ...] = tuple(dict.fromkeys(codecs))  # distinct codecs of the layers
        self.low_codec = low_codec
        self.policy = policy
        self.head_dim = head_dim
        self._config = config
        self._model = weakref.ref(model)

    @property
    def spec(self) -> str:
        """Canonical spec string of this cache."""
        return str(self.parsed)

    def __repr__(self) -> str:
        return f"CompressedCache({self.spec!r}, layers={len(self.layers)}, seen={self.get_seq_length()})"

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Record layer ``layer_idx``'s new keys/values; the kvshrink attention reads the rest."""
        if self._config._attn_implementation != ATTENTION:
            raise ModelError(
                f"the model's attention implementation is {self._config._attn_implementation!r}, not "
                f"'{ATTENTION}'; CompressedCache cannot serve it (do not change it while the cache is in use)"
            )
        layer = self.layers[layer_idx]
        keys, values = layer.update(key_states, value_states)
        announce(layer, keys)
        return keys, values

    def uninstall(self) -> None:
        """Give the model back the attention implementation it had before this cache."""
        model = self._model()
        if model is not None:
            uninstall(model)

    def __deepcopy__(self, memo: dict[int, Any]) -> CompressedCache:
        for shared in (self.codec, *self.codecs, self.low_codec, self.policy, self._config, self.parsed):
            memo[id(shared)] = shared
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            setattr(new, name, copy.deepcopy(value, memo))
        return new

    # -- bytes -------------------------------------------------------------------------------
    def memory_report(self) -> MemoryReport:
        """Per-layer bytes held and their fp16 ``DynamicCache`` equivalent."""
        rows = []
        cols = 0  # columns of the shared position buffer this cache's packed segments view
        for layer in self.layers:
            assert isinstance(layer, CompressedLayer)
            seen_ids: set[int] = set()
            packed = dense = meta = 0
            live = 0.0
            for seg in layer.segments():
                p, d, m = seg.nbytes(seen_ids)
                packed, dense, meta = packed + p, dense + d, meta + m
                if shares_columns(seg.pos):
                    cols = max(cols, seg.hi + 1)  # shared only when full and contiguous
                if layer.is_initialized:
                    live += float((seg.full_pos(layer.batch, layer.heads) >= 0).sum(-1).float().mean())
            if layer.comp is not None:
                d, m = layer.comp.nbytes()
                dense, meta = dense + d, meta + m
            if layer.kt is not None:  # the fitted key basis (white=)
                meta += layer.kt.nbytes()
            if layer.store is not None:  # the kernel store's capacity not yet filled is held too
                packed += layer.store.slack_nbytes()
            baseline = (
                layer.seen if layer.sliding_window is None else min(layer.seen, layer.sliding_window - 1)
            )
            fp16 = 0
            if layer.is_initialized:
                assert layer.seen_valid is not None
                meta += layer.seen_valid.numel() * layer.seen_valid.element_size()
                fp16 = 2 * layer.batch * layer.heads * 2 * self.head_dim * baseline
            backup, resident_live = 0, live
            if layer.pages is not None:  # page digests are resident; ArkVale's blocks are the backup
                if layer.pages.policy.recall:
                    backup, packed = packed, 0
                copies, digests = layer.pages.nbytes(seen_ids)
                packed, meta = packed + copies, meta + digests
                resident_live = live - layer.pages.evicted_live()
            rows.append(
                LayerBytes(
                    layer.layer_idx,
                    layer.sliding_window,
                    layer.seen,
                    layer.slots(),
                    live,
                    packed,
                    dense,
                    meta,
                    baseline,
                    fp16,
                    backup,
                    resident_live,
                )
            )
        parts: dict[tuple[Any, ...], int] = {}  # a rotation or codebook two layers' codecs share: once
        for codec in (*self.codecs, self.low_codec):
            if codec is not None:
                parts.update(shared_parts(codec, self.head_dim))
        shared = sum(parts.values()) + column_bytes(cols)
        return MemoryReport(self.spec, tuple(rows), shared)

    def nbytes(self) -> int:
        """Total bytes held anywhere (a host backup included), shared codec state counted once;
        ``memory_report().resident`` is the part attention keeps on its device."""
        return self.memory_report().nbytes
