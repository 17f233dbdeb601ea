"""Page tables: digests of a layer's packed blocks and the read-time hook of page policies.

A :class:`PageTable` sits beside the packed blocks of one layer whose policy is a
:class:`~kvshrink.policies.paged.PagePolicy` (Quest, ArkVale); each block is one page.

- Written: when blocks are packed, the table decodes their keys and stores the policy's digest
  per page and KV head. Digests are of the *decoded* keys, post-RoPE, because those are the
  keys attention scores: Quest's min/max box is then a true bound of the logits actually
  computed, codec error included (one extra key decode per page, once). They are stored in
  float16 rounded outwards (``hi`` up, ``lo`` down), so the bound survives the rounding; their
  bytes count as resident bookkeeping. With the policy's ``dbits=8`` they are int8 with one
  float32 scale per page and KV head, again rounded outwards: half the bytes, which at 16-token
  pages is what keeps a recall policy's resident set near 8x (a digest is 2·D values per page).
- Read: before a forward reads the blocks, :meth:`PageTable.select` shows the policy the
  digests and the queries and gets the pages to read per row, KV head (and query);
  :meth:`PageTable.read` decodes only pages someone reads and yields them with that mask.
- Recall (ArkVale): the blocks themselves are the backup store, moved to host memory on CUDA
  (pinned) and counted as non-resident everywhere; the device keeps a copy of only the resident
  heads of each page (one :class:`~kvshrink.codecs.Packed` per row, sliced along the KV-head
  axis). Selecting an evicted page copies its heads back from the backup; dropping one frees
  the copy. Pages never change once written, so nothing is ever written back.

The first forward of a layer finds no page and stays dense; every later forward (decode steps,
a question, prompt chunks) goes through selection.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..codecs import Codec, Packed
from ..core.errors import InputError
from ..policies.paged import PagePolicy, PageView
from .segment import Segment, cat_dense

__all__ = ["PageTable", "make_page_table", "narrow"]

_Copy = tuple[torch.Tensor, Packed, Packed]  # (KV heads held, keys, values) of one page row


def make_page_table(policy: object, layer_idx: int, codec: Codec, dense: int) -> PageTable | None:
    """A table for layer ``layer_idx`` if ``policy`` pages it (a page policy, past its dense layers)."""
    if not isinstance(policy, PagePolicy) or layer_idx < policy.config.dense_layers:
        return None
    return PageTable(policy, layer_idx, codec, dense)


def narrow(
    allowed: torch.Tensor | None, skip: bool, sel: torch.Tensor, r0: int, r1: int
) -> tuple[torch.Tensor | None, bool]:
    """Restrict a chunk's ``(allowed, skip)`` to the selected slots ``sel`` ``[B, Hkv, Q|1, T]``."""
    if skip:
        return None, True
    s = sel if sel.shape[2] == 1 else sel[:, :, r0:r1]
    allowed = s if allowed is None else allowed & s
    return allowed, not bool(allowed.any())


def _outward(x: torch.Tensor, up: bool) -> torch.Tensor:
    """``x`` in float16, rounded up (``up``) or down so the stored box still contains the keys."""
    h = x.half()
    bad = h.float() < x if up else h.float() > x
    if bool(bad.any()):
        towards = torch.full_like(h, float("inf") if up else float("-inf"))
        h = torch.where(bad, torch.nextafter(h, towards), h)
    return h


def _int8_outward(hi: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hi_q, lo_q, scale)``: int8 corners and a float32 scale per page-head whose box
    ``[lo_q·scale, hi_q·scale]`` contains ``[lo, hi]`` (checked in float32, as scores use it)."""
    top = torch.maximum(hi.abs(), lo.abs()).amax(-1).float()
    scale = (top / 126.0).clamp_min(torch.finfo(torch.float32).tiny)
    sf = scale[..., None]
    hq = torch.ceil(hi / sf)
    hq = hq + (hq * sf < hi).float()  # division rounding: one step is always enough
    lq = torch.floor(lo / sf)
    lq = lq - (lq * sf > lo).float()
    return hq.clamp(-127, 127).to(torch.int8), lq.clamp(-127, 127).to(torch.int8), scale


def _heads(p: Packed, heads: torch.Tensor, device: torch.device) -> Packed:
    """KV heads ``heads`` of a row's packed ``[Hkv, T, D]`` (every codec tensor leads with Hkv)."""
    n = p.shape[0]
    for name, t in p.tensors.items():
        if t.dim() == 0 or t.shape[0] != n:
            raise InputError(
                f"{p.spec}: tensor {name!r} of shape {tuple(t.shape)} does not lead with the {n} KV heads; "
                "a recall policy (arkvale) needs a codec whose packed layout splits by head"
            )
    idx = heads.to(next(iter(p.tensors.values())).device)
    tensors = {k: t.index_select(0, idx).to(device) for k, t in p.tensors.items()}
    return Packed(p.spec, p.role, (heads.numel(), *p.shape[1:]), p.dtype, tensors, dict(p.meta))


def _append(old: torch.Tensor | None, pages: list[torch.Tensor]) -> torch.Tensor:
    """``old`` ``[B, Hkv, P, ...]`` with per-page ``[B, Hkv, ...]`` tensors appended along P."""
    new = torch.stack(pages, 2)
    return new if old is None else torch.cat([old, new], 2)


def _to_host(p: Packed) -> Packed:
    """The backup copy of ``p``: pinned host memory on CUDA, ``p`` itself on CPU."""
    if all(t.device.type == "cpu" for t in p.tensors.values()):
        return p
    tensors = {k: t.to("cpu").pin_memory() for k, t in p.tensors.items()}
    return Packed(p.spec, p.role, p.shape, p.dtype, tensors, dict(p.meta))


class PageTable:
    """Digests, live-token counts and (recall policies) resident copies of one layer's pages.

    Tensors, P pages: ``hi``/``lo`` ``[B, Hkv, P, D]`` float16, ``counts`` ``[B, Hkv, P]``
    int32 live tokens, ``resident`` ``[B, Hkv, P]`` bool (always the live pages for Quest).
    ``recalls`` counts page-heads copied back from the backup.
    """

    def __init__(self, policy: PagePolicy, layer_idx: int, codec: Codec, dense: int) -> None:
        self.policy = policy
        self.layer_idx = layer_idx
        self.codec = codec
        self.dense = dense
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.hi: torch.Tensor | None = None
        self.lo: torch.Tensor | None = None
        self.dscale: torch.Tensor | None = None  # [B, Hkv, P] float32, dbits=8 only
        self.counts: torch.Tensor | None = None
        self.resident: torch.Tensor | None = None
        self.copies: list[list[_Copy | None]] = []
        self.recalls = 0

    def __repr__(self) -> str:
        return f"PageTable({self.policy}, layer={self.layer_idx}, pages={self.n})"

    # -- write -------------------------------------------------------------------------------
    def sync(self, blocks: list[Segment], query: torch.Tensor, seen_valid: torch.Tensor) -> None:
        """Digest the blocks packed since the last call; a recall policy then backs them up and
        bounds the resident set with the forward's last query."""
        new = blocks[self.n :]
        if not new:
            return
        b, hk = query.shape[0], new[0].keys[0].shape[0]  # type: ignore[index]
        his, los, counts, scales = [], [], [], []
        for seg in new:
            assert seg.keys is not None and seg.values is not None
            keys = torch.stack([self.codec.decode(p, torch.float32) for p in seg.keys])
            live = seg.full_pos(b, hk) >= 0
            hi, lo = self.policy.digest(keys, live)
            if self.policy.config.dbits == 8:
                hq, lq, sc = _int8_outward(hi, lo)
                his.append(hq)
                los.append(lq)
                scales.append(sc)
            else:
                his.append(_outward(hi, up=True))
                los.append(_outward(lo, up=False))
            counts.append(live.sum(-1, dtype=torch.int32))
            if self.policy.recall:  # a fresh page is resident in the heads it holds tokens of
                row_copies: list[_Copy | None] = []
                for row, (k, v) in enumerate(zip(seg.keys, seg.values)):
                    heads = live[row].any(-1).nonzero().flatten()
                    row_copies.append(
                        (heads, _heads(k, heads, query.device), _heads(v, heads, query.device))
                        if heads.numel()
                        else None
                    )
                self.copies.append(row_copies)
                seg.keys = [_to_host(p) for p in seg.keys]
                seg.values = [_to_host(p) for p in seg.values]
        self.hi, self.lo = _append(self.hi, his), _append(self.lo, los)
        if scales:
            self.dscale = _append(self.dscale, scales)
        self.counts = _append(self.counts, counts)
        self.resident = _append(self.resident, [c > 0 for c in counts])
        self.n = len(blocks)
        if self.policy.recall:
            self.select(blocks, query[:, :, -1:], seen_valid)

    # -- read --------------------------------------------------------------------------------
    def view(self, query: torch.Tensor, seen_valid: torch.Tensor) -> PageView:
        assert self.hi is not None and self.lo is not None and self.counts is not None
        assert self.resident is not None
        b, h, nq, d = query.shape
        hk = self.hi.shape[1]
        grouped = query.float().reshape(b, hk, h // hk, nq, d)
        hi, lo = self.hi, self.lo
        if self.dscale is not None:
            sf = self.dscale[..., None]
            hi, lo = hi.float() * sf, lo.float() * sf
        return PageView(
            self.layer_idx, grouped, hi, lo, self.counts > 0, self.resident, seen_valid, self.dense
        )

    def select(
        self, blocks: list[Segment], query: torch.Tensor, seen_valid: torch.Tensor
    ) -> torch.Tensor | None:
        """``[B, Hkv, Q|1, P]`` bool pages each row, KV head (and query) reads; None: no page yet.

        A recall policy's answer becomes the resident set (recalling and dropping copies)."""
        if self.n == 0:
            return None
        view = self.view(query, seen_valid)
        pick = self.policy.select_pages(view)
        b, hk, p = view.live.shape
        nq = query.shape[2]
        if pick.dtype != torch.bool or pick.dim() != 4 or pick.shape[:2] != (b, hk) or pick.shape[-1] != p:
            raise InputError(f"{self.policy}: select_pages must return bool [B={b}, Hkv={hk}, Q, P={p}]")
        if pick.shape[2] not in (1, nq) or (self.policy.recall and pick.shape[2] != 1):
            raise InputError(
                f"{self.policy}: select_pages returned {pick.shape[2]} query rows for {nq} queries"
            )
        pick = pick & view.live[:, :, None]
        if self.policy.recall:
            self._settle(blocks, pick[:, :, 0], query.device)
            assert self.resident is not None
            return self.resident[:, :, None]
        return pick

    def _settle(self, blocks: list[Segment], want: torch.Tensor, device: torch.device) -> None:
        """Make ``want`` ``[B, Hkv, P]`` the resident set: copy recalled heads, drop the others."""
        assert self.resident is not None
        changed = (want != self.resident).any(1)  # [B, P]
        self.recalls += int((want & ~self.resident).sum())
        for row, page in changed.nonzero().tolist():
            heads = want[row, :, page].nonzero().flatten()
            seg = blocks[page]
            assert seg.keys is not None and seg.values is not None
            self.copies[page][row] = (
                None
                if heads.numel() == 0
                else (heads, _heads(seg.keys[row], heads, device), _heads(seg.values[row], heads, device))
            )
        self.resident = want.clone()

    def read(
        self, blocks: list[Segment], pick: torch.Tensor, limit: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, Segment, torch.Tensor]]:
        """Yield ``(k, v, seg, sel)``: float32 keys/values of about ``limit`` slots of read pages,
        their bookkeeping and ``sel`` ``[B, Hkv, Q|1, T]``, the slots each query may read."""
        used = pick.any(2)  # [B, Hkv, P]
        group: list[tuple[Segment, torch.Tensor]] = []
        size = 0
        for page in used.flatten(0, 1).any(0).nonzero().flatten().tolist():
            seg = blocks[page]
            if group and size + seg.size > limit:
                yield self._merge(group)
                group, size = [], 0
            k, v = self._dense(blocks, page)
            dense = Segment(pos=seg.pos, lo=seg.lo, hi=seg.hi, full=seg.full, c0=seg.c0, k=k, v=v)
            group.append((dense, pick[..., page : page + 1].expand(*pick.shape[:3], seg.size)))
            size += seg.size
        if group:
            yield self._merge(group)

    @staticmethod
    def _merge(group: list[tuple[Segment, torch.Tensor]]):
        seg = cat_dense([s for s, _ in group])
        sel = torch.cat([m for _, m in group], -1)
        assert seg.k is not None and seg.v is not None
        return seg.k, seg.v, seg, sel

    def _dense(self, blocks: list[Segment], page: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 keys/values of a page as attention may read them (resident heads only)."""
        if not self.policy.recall:
            return blocks[page].dense(self.codec)
        seg = blocks[page]
        assert seg.keys is not None and self.resident is not None
        b, hk, t = self.resident.shape[0], self.resident.shape[1], seg.size
        dk, dv = seg.keys[0].shape[-1], seg.values[0].shape[-1]  # type: ignore[index]
        device = self.resident.device
        k = torch.zeros(b, hk, t, dk, device=device)
        v = torch.zeros(b, hk, t, dv, device=device)
        for row, copy in enumerate(self.copies[page]):
            if copy is not None:
                heads, kp, vp = copy
                k[row, heads] = self.codec.decode(kp, torch.float32)
                v[row, heads] = self.codec.decode(vp, torch.float32)
        return k, v

    # -- rows, bytes -------------------------------------------------------------------------
    def index_rows(self, idx: torch.Tensor) -> None:
        """Keep batch rows ``idx`` (beam reorder, selection, repetition), like the blocks."""
        if self.n == 0:
            return
        for name in ("hi", "lo", "counts", "resident", "dscale"):
            t = getattr(self, name)
            if t is None:
                continue
            setattr(self, name, t.index_select(0, idx.to(t.device)))
        rows = idx.tolist()
        self.copies = [[page[i] for i in rows] for page in self.copies]

    def nbytes(self, seen: set[int]) -> tuple[int, int]:
        """``(resident packed copies, digests and bookkeeping)`` bytes; ``seen`` dedupes shared rows."""
        packed = 0
        for page in self.copies:
            for copy in page:
                if copy is not None:
                    for p in copy[1:]:
                        if id(p) not in seen:
                            seen.add(id(p))
                            packed += p.nbytes()  # type: ignore[union-attr]
        tensors = [t for t in (self.hi, self.lo, self.dscale, self.counts, self.resident) if t is not None]
        return packed, sum(t.numel() * t.element_size() for t in tensors)

    def evicted_live(self) -> float:
        """Live tokens per row-head held only in the backup (mean over rows and KV heads)."""
        if self.counts is None or self.resident is None or not self.policy.recall:
            return 0.0
        return float((self.counts * ~self.resident).sum(-1).float().mean())
