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

from dataclasses import replace

import torch
from transformers.cache_utils import CacheLayerMixin

from ..codecs import Codec
from ..core.errors import InputError
from ..policies import Decision, LayerView, Observation, Policy
from .attention import OnlineSoftmax, attend_own_tokens
from .chunks import chunk_mask, read_chunks
from .compact import compact, reclaimable
from .compensation import Compensation
from .config import HOLD_DTYPES, CacheConfig
from .keyspace import KeyTransform
from .lut import LUT_MAX_ROWS
from .observe import TILE, observe_slots
from .pages import make_page_table, narrow
from .precision import demote, low_slots
from .segment import Segment, cat_dense, encode_segment
from .store import PackedStore, make_store

__all__ = ["CompressedLayer"]


class CompressedLayer(CacheLayerMixin):
    """Packed blocks + a full-precision window for one attention layer.

    ``sliding_window``: set for sliding-window layers (HF rule: a query at column ``q`` sees keys
    at columns ``> q - sliding_window``); such a layer drops blocks nobody can see any more and
    is never touched by the policy (it is already bounded). ``n_layers``: decoder layers of the
    model, shown to the policy (per-layer budgets). ``low_codec``: packs the tokens a precision
    policy demotes.
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
        n_layers: int = 1,
        low_codec: Codec | None = None,
        white: tuple[int, float] = (0, 0.1),
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_layers = n_layers
        self.codec = codec
        self.low_codec = low_codec
        self.policy = policy
        self.config = config
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.window_size = config.window if sliding_window is None else min(config.window, sliding_window - 1)
        self.seen = 0
        self.step = 0  # single-token forwards since the last multi-token one
        self.blocks: list[Segment] = []
        self.window: Segment | None = None
        self.low: list[Segment] = []  # runs packed with low_codec
        self.comp: Compensation | None = None
        self.seen_valid: torch.Tensor | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self.pages = make_page_table(policy, layer_idx, codec, config.window)  # Quest/ArkVale pages
        self.store: PackedStore | None = None  # blocks in one tensor per field, for the decode kernel
        self.white = white  # (rank, shrink) of the key basis fitted at the first forward (0: none)
        self.kt: KeyTransform | None = None

    def __repr__(self) -> str:
        kind = f"sliding={self.sliding_window}" if self.is_sliding else "full"
        return f"CompressedLayer({self.layer_idx}, {kind}, seen={self.seen}, blocks={len(self.blocks)})"

    # -- transformers layer contract ---------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = HOLD_DTYPES[self.config.dtype] or key_states.dtype  # the window's, see CacheConfig
        self.batch, self.heads = key_states.shape[0], key_states.shape[1]
        self.seen_valid = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        self.store = make_store(
            self.config, self.codec, self.policy, self.is_sliding, key_states, value_states
        )
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
        self.seen = self.step = 0
        self.blocks, self.window, self._pending = [], None, None
        self.low, self.comp = [], None
        self.kt = None
        self.seen_valid = None
        self.store = None
        self.is_initialized = False
        if self.pages is not None:
            self.pages.reset()

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
        if self.store is not None:
            self.store.index_rows(idx, self.blocks)
        if self.comp is not None:
            self.comp.index_rows(idx)
        if self.kt is not None:
            self.kt.index_rows(idx)
        assert self.seen_valid is not None
        self.seen_valid = self.seen_valid.index_select(0, idx)
        self.batch = idx.numel()
        if self.pages is not None:
            self.pages.index_rows(idx)

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
            if pad_read:  # some column is hidden: look at this forward's (a GPU sync, so only then)
                new_valid = mask2d[:, start : self.seen]
                if bool(new_valid.all()):
                    new_valid = None
        if self.white[0]:  # hold A·k, read with A⁻¹·q (.keyspace): same scores, error where q does not look
            if self.kt is None:
                self.kt = KeyTransform.fit(query, k_new, new_valid, *self.white)
            k_new, query = self.kt.keys(k_new), self.kt.queries(query)
        pos = qcols.to(torch.int32).view(1, 1, nq)
        if new_valid is not None:
            pos = pos.expand(self.batch, 1, nq).masked_fill(~new_valid[:, None], -1)
        new = Segment(
            pos=pos, lo=start, hi=start + nq - 1, full=new_valid is None, c0=start, k=k_new, v=v_new
        )
        if self._kernel_step(nq, pad_read):
            assert self.store is not None
            prev = self.window
            before = self.store.n
            self._commit(new, new_valid, None)  # the new token joins the window (which may flush)
            flushed = self.store.n - before
            if not flushed:
                w = self.window
                assert w is not None
                return self.store.attend(query, scaling, (w.k, w.v)).to(query.dtype)  # type: ignore[arg-type]
            # a flush packed tokens the PyTorch path still reads exact in this forward (the old
            # window and the new token): read them exact too, packed from the next step on
            k = k_new if prev is None or not prev.size else torch.cat([prev.k, k_new], dim=2)
            v = v_new if prev is None or not prev.size else torch.cat([prev.v, v_new], dim=2)
            return self.store.attend(query, scaling, (k, v), held_back=flushed).to(query.dtype)
        pad2d = mask2d if pad_read else None
        sources = [*self.segments(), new]

        n_obs = self.policy.observed_queries(nq) if self.policy is not None else 0
        basis = self._basis(query.shape[-1], v_new.shape[-1])
        state = OnlineSoftmax(
            query, self.heads, scaling, v_new.shape[-1], capture=n_obs > 0 and nq == 1, basis=basis
        )
        if nq > 1 and attend_own_tokens(state, k_new, v_new, new.pos, qcols, self.sliding_window):
            read = self.segments()  # the prompt's own tokens are done: read only what was held
        else:
            read = sources
        lut = basis is not None and nq * (query.shape[1] // self.heads) <= LUT_MAX_ROWS
        for k, v, seg, sel, rot in self._reads(read, query, basis is not None, lut):
            rows = max(1, TILE // max(1, query.shape[0] * query.shape[1] * seg.size))
            for r0 in range(0, nq, rows):
                r1 = min(nq, r0 + rows)
                allowed, skip = self._mask(seg, qcols[r0:r1], pad2d)
                if sel is not None:
                    allowed, skip = narrow(allowed, skip, sel, r0, r1)
                if not skip:
                    state.update(k, v, allowed, r0, r1, rot)
        if self.comp is not None:
            self.comp.attend(state, qcols)
        out = state.result().to(query.dtype).transpose(1, 2).contiguous()

        obs = None
        if n_obs:
            assert self.policy is not None  # n_obs > 0 only with a policy
            obs = observe_slots(self, self.policy, state, sources, qcols, n_obs, pad2d)
        self._commit(new, new_valid, obs)
        if self.pages is not None:
            self.pages.sync(self.blocks, query, self.seen_valid)  # type: ignore[arg-type]
        return out

    def _kernel_step(self, nq: int, pad_read: bool) -> bool:
        """This step can be one kernel launch: one query, a store in use, no empty slot (no
        padding anywhere in the mask, so the new token is valid too)."""
        w = self.window
        return (
            self.store is not None
            and self.store.n > 0
            and nq == 1
            and not pad_read
            and (w is None or w.full or not w.size)
        )

    def _reads(self, read: list[Segment], query: torch.Tensor, rotated: bool, lut: bool):
        """Yield ``(k, v, seg, sel, rotated)`` over ``read``; ``sel`` restricts packed pages to
        those a page policy selected for ``query`` (None: every slot may be read); page reads
        come decoded in the original basis."""
        pick = None
        if self.pages is not None and self.blocks:
            assert self.seen_valid is not None
            pick = self.pages.select(self.blocks, query, self.seen_valid)
        if pick is None:
            for k, v, seg, rot in self._chunks(read, rotated, lut):
                yield k, v, seg, None, rot
            return
        # read = segments() (+ the new tokens), which starts with the blocks
        for k, v, seg, sel in self.pages.read(self.blocks, pick, self.config.chunk):  # type: ignore[union-attr]
            yield k, v, seg, sel, False
        for k, v, seg, rot in self._chunks(read[len(self.blocks) :], rotated, lut):
            yield k, v, seg, None, rot

    def _basis(self, dq: int, dv: int):
        """The rotation codec's Π when packed blocks can be read in its basis, else None."""
        codec = self.codec
        if dq != dv or not hasattr(codec, "decode_rotated") or getattr(codec.config, "prerope", False):
            return None
        return codec.rotation(dq)  # type: ignore[attr-defined]

    def _chunks(self, sources: list[Segment], rotated: bool = False, lut: bool = False):
        return read_chunks(self.codec, sources, self.config.chunk, rotated, lut)

    def _mask(
        self, seg: Segment, qcols: torch.Tensor, pad2d: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, bool]:
        return chunk_mask(seg, qcols, pad2d, self.sliding_window)

    # -- commit: scores, policy, reclaim, flush ----------------------------------------------
    def _commit(self, new: Segment, new_valid: torch.Tensor | None, obs: Observation | None) -> None:
        nq = new.size
        stateful = self.policy is not None and not self.is_sliding and self.policy.slot_floats > 0
        if stateful:  # zeros for the new slots; the policy's update_state fills them in
            assert self.policy is not None
            new.acc = torch.zeros(self.policy.slot_floats, self.batch, self.heads, nq, device=self.device)
        if new.k is not None and new.k.dtype != self.dtype:  # held as cache:dtype says
            new.k, new.v = new.k.to(self.dtype), new.v.to(self.dtype)  # type: ignore[union-attr]
        self.window = cat_dense(([self.window] if self.window is not None else []) + [new])
        assert self.seen_valid is not None
        self.seen_valid = self.seen_valid + (nq if new_valid is None else new_valid.sum(-1))
        self.step = 0 if nq > 1 else self.step + 1

        changed = False
        if self.policy is not None and not self.is_sliding:
            changed = self._apply_policy(nq, obs)
        if self.is_sliding:
            assert self.sliding_window is not None
            horizon = self.seen - self.sliding_window  # columns <= horizon are never seen again
            self.blocks = [b for b in self.blocks if b.hi > horizon]
        if changed:
            self._reclaim()
        self._flush()

    def _apply_policy(self, nq: int, obs: Observation | None) -> bool:
        assert self.policy is not None and self.seen_valid is not None
        segs = self.segments()
        positions = torch.cat([s.full_pos(self.batch, self.heads) for s in segs], dim=-1).long()
        view = LayerView(self.layer_idx, positions, None, self.seen_valid, nq, self.n_layers, None, self.step)
        state = None
        if self.policy.slot_floats:  # the policy folds this forward into the state kept per slot
            k = self.policy.slot_floats
            zeros = torch.zeros(k, self.batch, self.heads, 1, device=self.device)
            # low runs keep no state (a demotion is final): zeros stand in for them
            state = torch.cat(
                [zeros.expand(-1, -1, -1, s.size) if s.acc is None else s.acc for s in segs], -1
            )
            state = self.policy.update_state(replace(view, state=state), obs)
            a = 0
            for seg in segs:
                if seg.codec is None:
                    seg.acc = state[..., a : a + seg.size]
                a += seg.size
        if self.policy.accumulate and state is not None:
            scores: torch.Tensor | None = state[0]
        else:
            scores = None if obs is None else obs.mass
        if scores is not None:
            scores = scores.masked_fill(positions < 0, 0.0)
        low = low_slots(self.low, positions.shape[-1], self.batch, self.heads)
        view = replace(view, scores=scores, state=state, low=low)
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

    def _sink_slots(self, piece: Segment) -> int:
        """How many leading slots of ``piece`` are among the sequence's first ``sinks`` tokens
        (``cache:sinks``); only a contiguous piece starting before that can hold any."""
        n = self.config.sinks
        if not n or piece.c0 is None or piece.c0 >= n:
            return 0
        return min(n - piece.c0, piece.size)

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
        pieces = [w.slice(i * block, (i + 1) * block) for i in range(n_blocks)]
        if self.store is not None and not all(p.full for p in pieces):
            self.store = None  # empty slots (left padding): the PyTorch path reads from now on
        if self.store is not None:
            self.blocks.extend(self.store.append(pieces, self.blocks))
        else:
            for piece in pieces:
                if piece.hi < 0 or (horizon is not None and piece.hi <= horizon):
                    continue  # nothing anyone will attend to again
                sink = self._sink_slots(piece)
                if sink:  # the first tokens stay as they are held in the window, for good
                    self.blocks.append(piece.slice(0, sink).owned())
                    if sink == piece.size:
                        continue
                    piece = piece.slice(sink, piece.size)
                self.blocks.append(encode_segment(self.codec, piece))
        self.window = w.slice(n_blocks * block, w.size).owned()
