"""Attention over chunks of keys with an online softmax, in plain PyTorch (flash-decoding style).

The cache feeds keys chunk by chunk (decoded packed blocks, the full-precision window, the new
tokens), so no more than one chunk of keys is ever in full precision at once. Queries are
grouped per KV head (``[B, Hkv, g, Q, D]``), so GQA never repeats keys. All arithmetic is
float32 whatever the model dtype; the running state per query row is the usual max ``m``,
normaliser ``l`` and weighted sum ``acc``.

A prompt's attention to its own tokens (dense, causal) goes through torch's fused CPU SDPA
kernel, which also returns the log-sum-exp, so its result folds into the same running state
(:meth:`OnlineSoftmax.merge`); where that kernel is missing, the generic path does it.

Policies that need attention probabilities (SnapKV, H2O) get them here too, without eager
attention: a single decode query keeps its masked logits (``N`` floats per head) and turns them
into probabilities once the final ``m, l`` are known; several observed queries (a prompt) take
a second pass over the chunks with the final ``m, l``. Besides the mass, a pass can weigh rows
(A2SF's forgetting factor) and count, per key, the rows that gave it at least a threshold
probability and the rows that could see it (Scissorhands, LazyEviction).
"""

from __future__ import annotations

import math

import torch

from ..codecs.primitives.rotation import Rotation

__all__ = ["Observed", "OnlineSoftmax", "allowed_mask", "attend_own_tokens"]

#: ``(mass, hits, seen)`` per key, ``[B, Hkv, T]`` each (see ``kvshrink.policies.Observation``)
Observed = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]

# fused SDPA returning (out, logsumexp); private aten op, so its absence is tolerated
_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def allowed_mask(
    kpos: torch.Tensor, qcols: torch.Tensor, sliding: int | None, pad2d: torch.Tensor | None
) -> torch.Tensor:
    """Which (query, key) pairs may attend: ``[B|1, Hkv|1, Q, T]`` bool.

    ``kpos``: ``[B|1, Hkv|1, T]`` key columns (``-1`` = empty slot); ``qcols``: ``[Q]`` query
    columns; ``sliding``: window of a sliding layer (HF rule ``kv > q - window``); ``pad2d``:
    ``[B, L]`` bool 2-D attention mask, honoured for every key column it covers.
    """
    kp = kpos.long()[..., None, :]
    qc = qcols[:, None]
    ok = (kp >= 0) & (kp <= qc)
    if sliding is not None:
        ok &= kp > qc - sliding
    if pad2d is not None:
        idx = kpos.long().clamp_min(0)
        if idx.shape[0] == 1:
            valid = pad2d[:, idx[0]]  # [B, Hkv|1, T]
        else:
            b, h, t = idx.shape
            valid = pad2d.gather(1, idx.reshape(b, h * t)).reshape(b, h, t)
        ok = ok & valid[..., None, :]
    return ok


class OnlineSoftmax:
    """Running softmax attention of ``q`` ``[B, H, Q, D]`` over key chunks ``[B, Hkv, T, D]``.

    ``update`` folds one chunk into query rows ``[r0, r1)``; ``result`` gives ``[B, H, Q, Dv]``.
    Rows that never saw an allowed key (left-padding queries) come out as zeros, not NaN, so
    padded positions stay finite and can be packed like any other token.
    """

    def __init__(
        self,
        q: torch.Tensor,
        n_kv_heads: int,
        scaling: float,
        dv: int,
        capture: bool = False,
        basis: Rotation | None = None,
    ):
        b, h, nq, d = q.shape
        g = h // n_kv_heads
        self.shape = (b, n_kv_heads, g, nq)
        self.q = (q.float() * scaling).reshape(b, n_kv_heads, g, nq, d)
        self.m = torch.full(self.shape, -math.inf, device=q.device)
        self.l = torch.zeros(self.shape, device=q.device)
        self.acc = torch.zeros(*self.shape, dv, device=q.device)
        # Rotated chunks (keys Πk, values Πv, as rotation codecs decode them without their Πᵀ)
        # score against Πq and accumulate into a second sum that is rotated back once at the
        # end: q·k = Πq·Πk, so the costly per-token Πᵀ of every decoded key and value is skipped.
        self.basis = basis
        self.q_rot = basis.apply(self.q) if basis is not None else None
        self.acc_rot = torch.zeros_like(self.acc) if basis is not None else None
        self.capture = capture
        self._logits: list[torch.Tensor] = []

    def _scores(
        self,
        k: torch.Tensor,
        allowed: torch.Tensor | None,
        r0: int,
        r1: int,
        rotated: bool = False,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, hk, g, nq = self.shape
        r = r1 - r0
        q = self.q
        if rotated:
            if self.q_rot is None:
                raise ValueError("a rotated chunk needs OnlineSoftmax(basis=...)")
            q = self.q_rot
        qt = q if (r0, r1) == (0, nq) else q[:, :, :, r0:r1]
        if isinstance(k, torch.Tensor):
            s = torch.matmul(qt.reshape(b, hk, g * r, -1), k.transpose(-1, -2)).view(b, hk, g, r, -1)
        else:  # codes scored by table lookup (cache.lut), always in the rotated basis
            s = k.scores(qt.reshape(b, hk, g * r, -1)).view(b, hk, g, r, -1)
        if bias is not None:
            s = s + bias[:, :, None, None, :]
        if allowed is not None:
            s.masked_fill_(~allowed[:, :, None], -math.inf)
        return s

    def update(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        allowed: torch.Tensor | None,
        r0: int,
        r1: int,
        rotated: bool = False,
        bias: torch.Tensor | None = None,
        observed: bool = True,
    ) -> None:
        """Fold keys ``k``/values ``v`` ``[B, Hkv, T, *]`` into rows ``[r0, r1)``.

        ``allowed``: ``[B|1, Hkv|1, r1 - r0, T]`` bool, or None when every pair may attend.
        ``rotated``: ``k``/``v`` are in the basis of ``basis`` (see ``__init__``).
        ``bias``: ``[B|1, Hkv|1, T]`` float32 added to the logits: ``log m`` makes a key count
        as ``m`` identical keys (a merged entry standing for ``m`` tokens). ``observed=False``:
        keys that are no slot of the layer (a compensation entry), left out of captured masses.
        """
        b, hk, g, nq = self.shape
        r = r1 - r0
        s = self._scores(k, allowed, r0, r1, rotated, bias)  # [B, Hkv, g, r, T]
        if self.capture and observed:
            self._logits.append(s)
        whole = (r0, r1) == (0, nq)
        m_old = self.m if whole else self.m[..., r0:r1]
        m_new = torch.maximum(m_old, s.amax(-1))
        m_safe = m_new.masked_fill(m_new == -math.inf, 0.0)
        p = torch.exp(s - m_safe[..., None])
        alpha = torch.exp(m_old - m_safe)
        if isinstance(v, torch.Tensor):
            pv = torch.matmul(p.view(b, hk, g * r, -1), v).view(b, hk, g, r, -1)
        else:
            pv = v.weighted(p.view(b, hk, g * r, -1)).view(b, hk, g, r, -1)
        target, other = ("acc_rot", "acc") if rotated else ("acc", "acc_rot")
        if whole:
            self.l = self.l * alpha + p.sum(-1)
            setattr(self, target, getattr(self, target) * alpha[..., None] + pv)
            if getattr(self, other) is not None:
                setattr(self, other, getattr(self, other) * alpha[..., None])
            self.m = m_new
        else:
            self.l[..., r0:r1] = self.l[..., r0:r1] * alpha + p.sum(-1)
            acc = getattr(self, target)
            acc[..., r0:r1, :] = acc[..., r0:r1, :] * alpha[..., None] + pv
            if getattr(self, other) is not None:
                getattr(self, other)[..., r0:r1, :] *= alpha[..., None]
            self.m[..., r0:r1] = m_new

    def merge(self, out: torch.Tensor, lse: torch.Tensor, r0: int, r1: int) -> None:
        """Fold a finished partial attention (``out`` ``[B, H, r, Dv]``, log-sum-exp ``lse``
        ``[B, H, r]``, ``-inf`` for rows that saw no key) into rows ``[r0, r1)``."""
        b, hk, g, _ = self.shape
        r = r1 - r0
        lse = lse.reshape(b, hk, g, r)
        m_old = self.m[..., r0:r1]
        m_new = torch.maximum(m_old, lse)
        m_safe = m_new.masked_fill(m_new == -math.inf, 0.0)
        alpha, beta = torch.exp(m_old - m_safe), torch.exp(lse - m_safe)
        self.l[..., r0:r1] = self.l[..., r0:r1] * alpha + beta
        self.acc[..., r0:r1, :] = (
            self.acc[..., r0:r1, :] * alpha[..., None] + out.reshape(b, hk, g, r, -1) * beta[..., None]
        )
        if self.acc_rot is not None:
            self.acc_rot[..., r0:r1, :] *= alpha[..., None]
        self.m[..., r0:r1] = m_new

    def result(self) -> torch.Tensor:
        """``[B, H, Q, Dv]`` float32 attention output."""
        b, hk, g, nq = self.shape
        acc = self.acc
        if self.acc_rot is not None and self.basis is not None:
            acc = acc + self.basis.apply_t(self.acc_rot)
        out = acc / self.l.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
        return out.reshape(b, hk * g, nq, -1)

    def _probs(self, s: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        m = self.m[..., r0:r1]
        m = m.masked_fill(m == -math.inf, 0.0)
        return torch.exp(s - m[..., None]) / self.l[..., r0:r1, None].clamp_min(
            torch.finfo(torch.float32).tiny
        )

    def captured_mass(self) -> torch.Tensor:
        """Attention mass per key of the captured rows: ``[B, Hkv, N]``, summed over rows,
        averaged over the query heads of each group (requires ``capture`` and whole-row updates)."""
        return self.captured_observation(None)[0]

    def captured_observation(self, threshold: float | str | None) -> Observed:
        """:meth:`observe` over the captured rows (every key of the layer, in slot order)."""
        s = torch.cat(self._logits, dim=-1)
        self._logits = []
        if threshold == "uniform":  # 1/t, t = keys the row may attend
            threshold = 1.0 / torch.isfinite(s[:, :, 0]).sum(-1).clamp_min(1)
        return self._observe(s, 0, self.shape[-1], None, threshold)

    def mass(
        self, k: torch.Tensor, allowed: torch.Tensor | None, r0: int, r1: int, rotated: bool = False
    ) -> torch.Tensor:
        """Second pass: attention mass of rows ``[r0, r1)`` on keys ``k``: ``[B, Hkv, T]``."""
        return self.observe(k, allowed, r0, r1, rotated=rotated)[0]

    def observe(
        self,
        k: torch.Tensor,
        allowed: torch.Tensor | None,
        r0: int,
        r1: int,
        weights: torch.Tensor | None = None,
        threshold: torch.Tensor | float | None = None,
        rotated: bool = False,
    ) -> Observed:
        """Second pass over keys ``k`` for rows ``[r0, r1)``: ``(mass, hits, seen)``, each ``[B, Hkv, T]``.

        ``weights``: ``[r1 - r0]`` per-row weights (None: 1). ``threshold``: a probability, or
        ``[B, Hkv, r1 - r0]`` per row, from which a row counts a key as a hit (after averaging
        the group's query heads); None skips ``hits`` and ``seen``.
        """
        return self._observe(self._scores(k, allowed, r0, r1, rotated), r0, r1, weights, threshold)

    def _observe(
        self,
        s: torch.Tensor,
        r0: int,
        r1: int,
        weights: torch.Tensor | None,
        threshold: torch.Tensor | float | None,
    ) -> Observed:
        p = self._probs(s, r0, r1)  # [B, Hkv, g, r, T]
        w = None if weights is None else weights.view(1, 1, -1, 1)
        mass = (p.sum(-2) if w is None else (p * w[:, :, None]).sum(-2)).mean(2)
        if threshold is None:
            return mass, None, None
        ok = torch.isfinite(s[:, :, 0])  # [B, Hkv, r, T]: masks are shared by a group
        theta = threshold[..., None] if isinstance(threshold, torch.Tensor) else threshold
        hit = (p.mean(2) >= theta) & ok
        if w is None:
            return mass, hit.sum(-2).float(), ok.sum(-2).float()
        return mass, (hit * w).sum(-2), (ok * w).sum(-2)


def attend_own_tokens(
    state: OnlineSoftmax,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    qcols: torch.Tensor,
    sliding: int | None,
    tile: int = 1024,
) -> bool:
    """Fold a forward's own keys ``k``/``v`` ``[B, Hkv, Q, D]`` (slot ``i`` = query ``i``,
    columns ``qcols``, ``pos`` ``[B|1, 1, Q]`` with ``-1`` at padding) into every query row.

    Row tiles of ``tile`` queries; each tile sees the keys before it (unmasked unless padding
    or a sliding window cuts them) and its own square (``is_causal``). Returns False, doing
    nothing, where the fused kernel is unavailable or refuses the inputs.
    """
    if k.device.type == "cuda":
        return _own_tokens_cuda(state, k, v, pos, sliding)
    if _FUSED is None or k.device.type != "cpu":
        return False
    nq = state.shape[3]
    q, kr, vr = _per_query_head(state, k, v)
    padded = bool((pos < 0).any())
    parts = []
    for r0 in range(0, nq, tile):
        r1 = min(nq, r0 + tile)
        a = 0 if sliding is None else max(0, r0 - sliding + 1)
        if a < r0:
            cut = sliding is not None and a <= r1 - 1 - sliding
            parts.append((r0, r1, a, r0, padded or cut, False))
        own_cut = sliding is not None and r1 - r0 > sliding
        parts.append((r0, r1, r0, r1, padded or own_cut, True))
    done = []
    try:
        for r0, r1, a, z, masked, diagonal in parts:
            qt, kt, vt = q[:, :, r0:r1], kr[:, :, a:z], vr[:, :, a:z]
            if not masked:
                out, lse = _FUSED(qt, kt, vt, 0.0, diagonal, scale=1.0)
            else:
                allowed = allowed_mask(pos[..., a:z], qcols[r0:r1], sliding, None)  # [B|1, 1, r, T]
                bias = torch.zeros(allowed.shape).masked_fill_(~allowed, -math.inf)
                out, lse = _FUSED(qt, kt, vt, 0.0, False, attn_mask=bias, scale=1.0)
                lse = lse.masked_fill(~allowed.any(-1), -math.inf)
            done.append((out, lse, r0, r1))
    except RuntimeError:  # pragma: no cover - a torch build whose kernel refuses these inputs
        return False
    for out, lse, r0, r1 in done:  # merged only once every part succeeded
        state.merge(out, lse, r0, r1)
    return True


def _per_query_head(
    state: OnlineSoftmax, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries ``[B, H, Q, D]`` and float32 keys/values repeated per query head (the fused SDPA
    ops take no GQA grouping)."""
    b, hk, g, nq = state.shape
    q = state.q.reshape(b, hk * g, nq, -1)
    kr = k.float()[:, :, None].expand(b, hk, g, nq, k.shape[-1]).reshape(b, hk * g, nq, -1)
    vr = v.float()[:, :, None].expand(b, hk, g, nq, v.shape[-1]).reshape(b, hk * g, nq, -1)
    return q, kr, vr


def _own_tokens_cuda(
    state: OnlineSoftmax, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, sliding: int | None
) -> bool:
    """The CUDA counterpart: one causal memory-efficient SDPA call in fp32 (it returns the
    log-sum-exp). Padding and sliding windows need a mask: those forwards take the generic path."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)
    nq = state.shape[3]
    if op is None or sliding is not None or k.shape[-1] != v.shape[-1] or bool((pos < 0).any()):
        return False
    q, kr, vr = _per_query_head(state, k, v)
    try:
        out, lse = op(q, kr, vr, None, True, 0.0, True, scale=1.0)[:2]
    except RuntimeError:  # pragma: no cover - a build whose kernel refuses these inputs
        return False
    state.merge(out, lse[..., :nq], 0, nq)
    return True
