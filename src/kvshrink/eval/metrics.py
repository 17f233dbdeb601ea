"""Fidelity metrics on captured caches and on next-token distributions.

Attention metrics use the true queries of the same pass (isolated per-layer mode): for each
layer and query head, ``o = softmax(q Kᵀ · scale + causal/window mask) V`` with exact vs decoded
K and V. They are cheap proxies; perplexity and KL on teacher-forced continuations are the
judges (a codec can raise cosine and still hurt perplexity, e.g. centred keys on SmolLM2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AttnFidelity", "attention_fidelity", "rel_mse", "token_nll_kl"]


@dataclass
class AttnFidelity:
    """Sums over (head, query) pairs so that layers and windows aggregate exactly."""

    cos_sum: float = 0.0
    n_queries: int = 0
    ip_sq_sum: float = 0.0
    n_pairs: int = 0

    def add(self, other: AttnFidelity) -> None:
        self.cos_sum += other.cos_sum
        self.n_queries += other.n_queries
        self.ip_sq_sum += other.ip_sq_sum
        self.n_pairs += other.n_pairs

    @property
    def attn_cosine(self) -> float:
        return self.cos_sum / max(self.n_queries, 1)

    @property
    def key_ip_rel_err(self) -> float:
        """RMS over visible (query, key) pairs of ``q·(k̂ - k) / (‖q‖ ‖k‖)``."""
        return (self.ip_sq_sum / max(self.n_pairs, 1)) ** 0.5


def _visible(q_pos: torch.Tensor, t: int, window: int | None) -> torch.Tensor:
    """[n, T] bool: key j visible from query at position p (causal, optional sliding window)."""
    j = torch.arange(t)
    vis = j[None, :] <= q_pos[:, None]
    if window:
        vis &= j[None, :] > (q_pos[:, None] - window)
    return vis


@torch.no_grad()
def attention_fidelity(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_hat: torch.Tensor,
    v_hat: torch.Tensor,
    scaling: float,
    window: int | None = None,
) -> AttnFidelity:
    """Attention-output cosine and key inner-product error for one layer.

    q ``[B, Hq, n, d]`` at positions ``q_pos`` ``[n]``; k, v, k_hat, v_hat ``[B, Hkv, T, d]``.
    Query heads are grouped onto their KV head (GQA) instead of repeating K and V; matmuls run
    in fp32 (errors of interest are >= 1e-6 relative) and sums accumulate in fp64.
    """
    b, hq, n, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    rep = hq // hkv
    qg = q.float().reshape(b, hkv, rep * n, d)  # [B, Hkv, G*n, d]: head h -> kv head h // rep
    k, v, k_hat, v_hat = (x.float() for x in (k, v, k_hat, v_hat))
    vis = _visible(q_pos.cpu(), t, window).to(q.device).repeat(rep, 1)  # [G*n, T]
    neg = torch.zeros(vis.shape, device=vis.device).masked_fill_(~vis, float("-inf"))  # [G*n, T]
    s = qg @ k.transpose(-1, -2)  # [B, Hkv, G*n, T]
    s_hat = qg @ k_hat.transpose(-1, -2)
    o = torch.softmax(neg + s * scaling, -1) @ v
    o_hat = torch.softmax(neg + s_hat * scaling, -1) @ v_hat
    cos = torch.nn.functional.cosine_similarity(o, o_hat, dim=-1, eps=1e-30)  # [B, Hkv, G*n]
    # q·(k̂-k)/(‖q‖‖k‖) as one matmul of unit queries against norm-scaled key errors
    qn = qg / qg.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    dk = (k_hat - k) / k.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    rel2 = (qn @ dk.transpose(-1, -2)).square_()  # [B, Hkv, G*n, T]
    ip_sq = float((rel2 * vis).sum(dtype=torch.float64))
    return AttnFidelity(
        cos_sum=float(cos.double().sum()),
        n_queries=cos.numel(),
        ip_sq_sum=ip_sq,
        n_pairs=int(vis.sum()) * b * hkv,
    )


def rel_mse(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[float, float]:
    """(squared error sum, squared norm sum): aggregate before dividing."""
    x, x_hat = x.double(), x_hat.double()
    return float(((x_hat - x) ** 2).sum()), float((x**2).sum())


@torch.no_grad()
def token_nll_kl(
    logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL of ``targets`` under ``logits`` and KL(ref ‖ logits). Shapes ``[N, V]``, ``[N]``."""
    logp = torch.log_softmax(logits.double(), -1)
    ref = torch.log_softmax(ref_logits.double(), -1)
    nll = -logp.gather(-1, targets[:, None]).squeeze(-1)
    kl = (ref.exp() * (ref - logp)).sum(-1)
    return nll, kl
