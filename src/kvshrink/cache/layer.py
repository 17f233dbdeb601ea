"""One layer of :class:`~kvshrink.cache.CompressedCache`.

Slots run oldest first: packed blocks, then the full-precision window. ``update`` only records
the new keys/values and returns them unchanged; the kvshrink attention function then calls
:meth:`CompressedLayer.attend`, which reads the packed blocks chunk by chunk with an online
softmax (never the whole layer in full precision), and only afterwards commits the new tokens:
policy scores are added, the policy decides, expired or evicted slots are given back, and the
window flushes its oldest ``block`` tokens into a packed block (quantize on write).

A precision policy's demoted tokens move to runs packed with the low codec
(:mod:`.precision`), kept in ``low`` ahead of the main blocks; a merging policy's dropped tokens
fold into one compensation entry per KV head (:mod:`.compensation`). Neither is ever compacted.

Masks come from this layer's own per-slot positions (columns of the 2-D attention mask), so a
layer holding fewer tokens than layer 0 (eviction, sliding window) is masked correctly; the
2-D mask is honoured for padding, both when a token is written and when it is read.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from ..codecs import Codec
from ..core.errors import InputError
from ..policies import Decision, LayerView, Policy
from .attention import OnlineSoftmax, allowed_mask, attend_own_tokens
from .compact import compact, reclaimable
from .compensation import Compensation
from .config import CacheConfig
from .precision import demote, low_slots
from .segment import Segment, cat_dense, encode_segment

__all__ = ["CompressedLayer"]

_TILE = 1 << 22  # score elements per (query rows x keys) tile in a prompt forward (16 MiB fp32)


class CompressedLayer(CacheLayerMixin):
    """Packed blocks + a full-precision window for one attention layer.

    ``sliding_window``: set for sliding-window layers (HF rule: a query at column ``q`` sees keys
    at columns ``> q - sliding_window``); such a layer drops blocks nobody can see any more and
    is never touched by the policy (it is already bounded). ``low_codec``: packs the tokens a
    precision policy demotes.
    """

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(
        self,
        layer_idx: int,
        codec: Codec,
        policy: Policy | None,
        config: CacheConfig,
        sliding_window: int | None = None,
        low_codec: Codec | None = None,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.codec = codec
        self.low_codec = low_codec
        self.policy = policy
        self.config = config
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.window_size = config.window if sliding_window is None else min(config.window, sliding_window - 1)
        self.seen = 0
        self.blocks: list[Segment] = []
        self.window: Segment | None = None
        self.low: list[Segment] = []  # runs packed with low_codec
        self.comp: Compensation | None = None
        self.seen_valid: torch.Tensor | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def __repr__(self) -> str:
        kind = f"sliding={self.sliding_window}" if self.is_sliding else "full"
        return f"CompressedLayer({self.layer_idx}, {kind}, seen={self.seen}, blocks={len(self.blocks)})"

    # -- transformers layer contract ---------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch, self.heads = key_states.shape[0], key_states.shape[1]
        self.seen_valid = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Record the new ``[B, Hkv, Q, D]`` keys/values; attention commits them. Returns them as is."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._pending is not None:
            raise InputError(
                f"layer {self.layer_idx}: the previous update was never attended (an interrupted forward, or "
                "an attention implementation other than 'kvshrink'); this cache is inconsistent, build a new one"
            )
        if key_states.shape[0] != self.batch or key_states.shape[1] != self.heads:
            raise InputError(
                f"CompressedCache holds batch {self.batch} x {self.heads} KV heads, got "
                f"{key_states.shape[0]} x {key_states.shape[1]}; build a new cache for a different batch"
            )
        self._pending = (key_states, value_states, self.seen)
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def get_seq_length(self) -> int:
        """Tokens the sequence has seen, evicted ones included: generate's next position."""
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen = 0
        self.blocks, self.window, self._pending = [], None, None
        self.low, self.comp = [], None
        self.seen_valid = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise InputError(
                "CompressedCache cannot be cropped (packed and evicted tokens cannot be rolled back); "
                "assisted/speculative decoding is not supported"
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(torch.arange(self.batch, device=self.device)[indices] if self.is_initialized else indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._rows(torch.arange(self.batch, device=self.device).repeat_interleave(repeats))

    def offload(self) -> None:
        raise InputError("CompressedCache does not support offloading")

    def prefetch(self) -> None:
        raise InputError("CompressedCache does not support offloading")

    def _rows(self, idx: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        idx = idx.to(self.device).long()
        for seg in self.segments():
            seg.index_rows(idx)
        if self.comp is not None:
            self.comp.index_rows(idx)
        assert self.seen_valid is not None
        self.seen_valid = self.seen_valid.index_select(0, idx)
        self.batch = idx.numel()

    # -- bookkeeping -------------------------------------------------------------------------
    def segments(self) -> list[Segment]:
        """Every slot run: low-precision runs, packed blocks, then the window."""
        return self.low + self._main()

    def _main(self) -> list[Segment]:
        return self.blocks + ([self.window] if self.window is not None and self.window.size else [])

    def slots(self) -> int:
        return sum(s.size for s in self.segments())

    # -- attention ---------------------------------------------------------------------------
    def attend(
        self, query: torch.Tensor, scaling: float, mask2d: torch.Tensor | None, pad_read: bool
    ) -> torch.Tensor:
        """Attention of ``query`` ``[B, H, Q, D]`` over this layer plus the pending tokens.

        ``mask2d``: ``[B, >= seen]`` bool 2-D attention mask or None; ``pad_read``: it has
        zeros, so it is also applied to the keys read. Returns ``[B, Q, H, Dv]``.
        """
        assert self._pending is not None
        k_new, v_new, start = self._pending
        self._pending = None
        nq = k_new.shape[-2]
        qcols = torch.arange(start, start + nq, device=query.device)
        new_valid = None
        if mask2d is not None:
            if mask2d.shape[-1] < self.seen:
                raise InputError(
                    f"attention_mask covers {mask2d.shape[-1]} tokens but the sequence has {self.seen}; "
                    "pass the 2-D mask of the whole sequence (past tokens included)"
                )
            new_valid = mask2d[:, start : self.seen]
            if bool(new_valid.all()):
                new_valid = None
        pos = qcols.to(torch.int32).view(1, 1, nq)
        if new_valid is not None:
            pos = pos.expand(self.batch, 1, nq).masked_fill(~new_valid[:, None], -1)
        new = Segment(
            pos=pos, lo=start, hi=start + nq - 1, full=new_valid is None, c0=start, k=k_new, v=v_new
        )
        pad2d = mask2d if pad_read else None
        sources = [*self.segments(), new]

        n_obs = self.policy.observed_queries(nq) if self.policy is not None else 0
        state = OnlineSoftmax(query, self.heads, scaling, v_new.shape[-1], capture=n_obs > 0 and nq == 1)
        if nq > 1 and attend_own_tokens(state, k_new, v_new, new.pos, qcols, self.sliding_window):
            read = self.segments()  # the prompt's own tokens are done: read only what was held
        else:
            read = sources
        for k, v, seg in self._chunks(read):
            rows = max(1, _TILE // max(1, query.shape[0] * query.shape[1] * seg.size))
            for r0 in range(0, nq, rows):
                r1 = min(nq, r0 + rows)
                allowed, skip = self._mask(seg, qcols[r0:r1], pad2d)
                if not skip:
                    state.update(k, v, allowed, r0, r1)
        if self.comp is not None:
            self.comp.attend(state, qcols)
        out = state.result().to(query.dtype).transpose(1, 2).contiguous()

        mass = None
        if n_obs:
            if nq == 1:
                mass = state.captured_mass()
            else:
                pieces = []
                for k, _, seg in self._chunks(sources):
                    piece = torch.zeros(self.batch, self.heads, seg.size, device=query.device)
                    rows = max(1, _TILE // max(1, query.shape[0] * query.shape[1] * seg.size))
                    for r0 in range(nq - n_obs, nq, rows):  # tiled: H2O observes every prompt query
                        r1 = min(nq, r0 + rows)
                        allowed, skip = self._mask(seg, qcols[r0:r1], pad2d)
                        if not skip:
                            piece += state.mass(k, allowed, r0, r1)
                    pieces.append(piece)
                mass = torch.cat(pieces, dim=-1)
        self._commit(new, new_valid, mass)
        return out

    def _chunks(self, sources: list[Segment]):
        """Yield ``(k, v, seg)``: float32 keys/values of consecutive slots, about ``chunk`` at a time."""
        limit = self.config.chunk
        pieces: list[Segment] = []
        for seg in sources:
            if seg.packed or seg.size <= limit:
                pieces.append(seg)
            else:
                pieces.extend(seg.slice(a, min(a + limit, seg.size)) for a in range(0, seg.size, limit))
        group: list[Segment] = []
        size = 0
        for seg in [*pieces, None]:  # type: ignore[list-item]
            if group and (seg is None or size + seg.size > limit):
                yield self._merge(group)
                group, size = [], 0
            if seg is not None:
                group.append(seg)
                size += seg.size

    def _merge(self, group: list[Segment]) -> tuple[torch.Tensor, torch.Tensor, Segment]:
        dense = [s.dense(self.codec) for s in group]
        k = dense[0][0] if len(dense) == 1 else torch.cat([d[0] for d in dense], dim=2)
        v = dense[0][1] if len(dense) == 1 else torch.cat([d[1] for d in dense], dim=2)
        if len(group) == 1:
            return k, v, group[0]
        b = max(s.pos.shape[0] for s in group)
        h = max(s.pos.shape[1] for s in group)
        pos = torch.cat([s.pos.expand(b, h, s.size) for s in group], dim=-1)
        live = [s for s in group if s.hi >= 0]
        meta = Segment(
            pos=pos,
            lo=min((s.lo for s in live), default=group[0].lo),
            hi=max((s.hi for s in live), default=-1),
            full=all(s.full for s in group),
        )
        return k, v, meta

    def _mask(
        self, seg: Segment, qcols: torch.Tensor, pad2d: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, bool]:
        """``(allowed, skip)`` for chunk ``seg`` and query columns ``qcols``."""
        qa, qb = int(qcols[0]), int(qcols[-1])
        w = self.sliding_window
        if seg.lo > qb or seg.hi < 0 or (w is not None and seg.hi <= qa - w):
            return None, True
        if pad2d is None and seg.full and seg.hi <= qa and (w is None or seg.lo > qb - w):
            return None, False
        return allowed_mask(seg.pos, qcols, w, pad2d), False

    # -- commit: scores, policy, reclaim, flush ----------------------------------------------
    def _commit(self, new: Segment, new_valid: torch.Tensor | None, mass: torch.Tensor | None) -> None:
        nq = new.size
        old = self.segments()
        if self.policy is not None and self.policy.accumulate and mass is not None:
            a = 0
            for seg in old:
                piece = mass[..., a : a + seg.size]
                if seg.codec is None:  # low runs keep no scores: a demotion is final
                    seg.acc = piece.clone() if seg.acc is None else seg.acc + piece
                a += seg.size
            new.acc = mass[..., a:].contiguous()
        elif self.policy is not None and self.policy.accumulate:
            new.acc = torch.zeros(self.batch, self.heads, nq, device=self.device)
        self.window = cat_dense(([self.window] if self.window is not None else []) + [new])
        assert self.seen_valid is not None
        self.seen_valid = self.seen_valid + (nq if new_valid is None else new_valid.sum(-1))

        changed = False
        if self.policy is not None and not self.is_sliding:
            changed = self._apply_policy(nq, mass)
        if self.is_sliding:
            assert self.sliding_window is not None
            horizon = self.seen - self.sliding_window  # columns <= horizon are never seen again
            self.blocks = [b for b in self.blocks if b.hi > horizon]
        if changed:
            self._reclaim()
        self._flush()

    def _apply_policy(self, nq: int, mass: torch.Tensor | None) -> bool:
        assert self.policy is not None and self.seen_valid is not None
        segs = self.segments()
        positions = torch.cat([s.full_pos(self.batch, self.heads) for s in segs], dim=-1).long()
        if self.policy.accumulate:
            zero = torch.zeros(self.batch, self.heads, 1, device=self.device)
            accs = [zero.expand(-1, -1, s.size) if s.acc is None else s.acc for s in segs]
            scores = torch.cat(accs, dim=-1)
        else:
            scores = mass
        if scores is not None:
            scores = scores.masked_fill(positions < 0, 0.0)
        low = low_slots(self.low, positions.shape[-1], self.batch, self.heads)
        view = LayerView(self.layer_idx, positions, scores, self.seen_valid, nq, low)
        decision = self.policy.on_prefill(view) if nq > 1 else self.policy.on_decode(view)
        if decision is None:
            return False
        self._check(decision, positions.shape)
        if decision.compensate:
            if self.comp is None:
                assert self.window is not None and self.window.k is not None and self.window.v is not None
                dk, dv = self.window.k.shape[-1], self.window.v.shape[-1]
                self.comp = Compensation.empty(self.batch, self.heads, dk, dv, self.device)
            self.comp.fold(segs, view.live & ~decision.keep, self.codec, self.batch, self.heads)
        changed, a = False, 0
        for seg in segs:
            changed |= seg.tombstone(decision.keep[..., a : a + seg.size])
            a += seg.size
        if decision.low_precision is not None:
            n_low = sum(s.size for s in self.low)
            marks = decision.low_precision[..., n_low:] & decision.keep[..., n_low:]
            assert self.low_codec is not None  # _check
            main, size = self._main(), self.config.chunk  # a run is read whole: at most a chunk
            runs = demote(main, marks, self.codec, self.low_codec, size, self.batch, self.heads)
            self.low.extend(runs)
            changed |= bool(runs)
        return changed

    def _check(self, decision: Decision, shape: torch.Size) -> None:
        for name in ("keep", "low_precision"):
            mask = getattr(decision, name)
            if mask is not None and (mask.shape != shape or mask.dtype != torch.bool):
                raise InputError(f"{self.policy}: {name} must be a bool mask of shape {tuple(shape)}")
        if decision.low_precision is not None and self.low_codec is None:
            raise InputError(
                f"{self.policy}: asks for low-precision slots but the cache has no low codec; "
                "precision policies name one with low=<codec spec>"
            )

    def _reclaim(self) -> None:
        """Drop packed blocks left empty, and compact once enough empty slots are shared."""
        self.blocks = [b for b in self.blocks if b.hi >= 0]
        self.low = [b for b in self.low if b.hi >= 0]
        segs = self._main()
        n = sum(s.size for s in segs)
        if reclaimable(segs, self.batch, self.heads) >= max(self.config.block, n // 8):
            self.blocks, self.window = compact(
                segs, self.codec, self.config.block, self.window_size, self.batch, self.heads, self.dtype
            )

    def _flush(self) -> None:
        """Move the window's oldest ``block`` tokens into packed blocks while it is too long."""
        w = self.window
        if w is None:
            return
        block, keep = self.config.block, self.window_size
        n_blocks = max(0, w.size - keep) // block
        if n_blocks == 0:
            return
        horizon = self.seen - self.sliding_window if self.sliding_window is not None else None
        for i in range(n_blocks):
            piece = w.slice(i * block, (i + 1) * block)
            if piece.hi < 0 or (horizon is not None and piece.hi <= horizon):
                continue  # nothing anyone will attend to again
            self.blocks.append(encode_segment(self.codec, piece))
        rest = w.slice(n_blocks * block, w.size)
        self.window = Segment(
            pos=rest.pos.clone(),
            lo=rest.lo,
            hi=rest.hi,
            full=rest.full,
            c0=rest.c0,
            acc=None if rest.acc is None else rest.acc.clone(),
            k=rest.k.clone() if rest.k is not None else None,
            v=rest.v.clone() if rest.v is not None else None,
        )
