"""The memory-fidelity frontier: every method measured on the same windows of real text.

Per window: one prefill of ``context`` tokens captures every layer's K/V and queries; each
method compresses that cache; attention metrics compare exact vs decoded; then the next
``continuation`` tokens are teacher-forced in one forward pass attending to the decoded cache
(the continuation's own keys stay exact, like a recent window), giving NLL and the KL of the
next-token distributions from the uncompressed cache's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..core.bytes import fp16_nbytes
from ..core.errors import DataError, SpecError
from .capture import capture
from .methods import LayerResult, build_method
from .metrics import AttnFidelity, attention_fidelity, rel_mse, token_nll_kl

__all__ = ["FrontierConfig", "FrontierResult", "MethodStats", "run_frontier", "window_starts"]


@dataclass(frozen=True)
class FrontierConfig:
    context: int = 2048
    windows: int = 6
    continuation: int = 256
    n_queries: int = 48

    def __post_init__(self) -> None:
        if self.context < 32:
            raise SpecError(f"--context must be >= 32, got {self.context}")
        if self.windows < 1:
            raise SpecError(f"--windows must be >= 1, got {self.windows}")
        if self.continuation < 1:
            raise SpecError(f"continuation must be >= 1, got {self.continuation}")


@dataclass
class MethodStats:
    """Everything measured for one method, kept per window so callers can aggregate seeds."""

    method: str
    held_bytes: int = 0
    fp16_bytes: int = 0
    numel: int = 0
    attn: AttnFidelity = field(default_factory=AttnFidelity)
    k_err: float = 0.0
    k_norm: float = 0.0
    v_err: float = 0.0
    v_norm: float = 0.0
    window_nll: list[float] = field(default_factory=list)  # mean NLL per window
    window_kl: list[float] = field(default_factory=list)

    def row(self, base_nll: Sequence[float]) -> dict:
        nll = sum(self.window_nll) / len(self.window_nll)
        base = sum(base_nll) / len(base_nll)
        deltas = [math.exp(a) - math.exp(b) for a, b in zip(self.window_nll, base_nll)]
        return {
            "method": self.method,
            "bits_per_element": self.held_bytes * 8 / max(self.numel, 1),
            "compression_ratio": self.fp16_bytes / max(self.held_bytes, 1),
            "attn_cosine": self.attn.attn_cosine,
            "key_ip_rel_err": self.attn.key_ip_rel_err,
            "ppl": math.exp(nll),
            "ppl_delta": math.exp(nll) - math.exp(base),
            "kl": sum(self.window_kl) / len(self.window_kl),
            # extras beyond the fixed interface
            "ppl_delta_se": _se(deltas),
            "kl_se": _se(self.window_kl),
            "key_rel_mse": self.k_err / max(self.k_norm, 1e-30),
            "value_rel_mse": self.v_err / max(self.v_norm, 1e-30),
            "window_ppl_delta": deltas,
        }


def _se(xs: Sequence[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    return (sum((x - m) ** 2 for x in xs) / (n - 1) / n) ** 0.5


@dataclass
class FrontierResult:
    model: str
    config: FrontierConfig
    base_nll: list[float]
    stats: list[MethodStats]

    @property
    def baseline_ppl(self) -> float:
        return math.exp(sum(self.base_nll) / len(self.base_nll))

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "context": self.config.context,
            "windows": self.config.windows,
            "baseline_ppl": self.baseline_ppl,
            "continuation": self.config.continuation,
            "rows": [s.row(self.base_nll) for s in self.stats],
        }


def window_starts(n_tokens: int, cfg: FrontierConfig) -> list[int]:
    """Evenly spread window starts over the text (deterministic)."""
    span = cfg.context + cfg.continuation + 1
    if n_tokens < span:
        raise DataError(
            f"text has {n_tokens} tokens; --context {cfg.context} needs at least {span} "
            f"(context + {cfg.continuation} continuation + 1)"
        )
    last = n_tokens - span
    if cfg.windows == 1:
        return [0]
    return [round(i * last / (cfg.windows - 1)) for i in range(cfg.windows)]


def _query_positions(t: int, n: int) -> torch.Tensor:
    """``n`` query positions spread over ``[t/8, t)``: early queries see too few keys to matter."""
    lo = max(t // 8, 1)
    return torch.unique(torch.linspace(lo, t - 1, min(n, t - lo)).round().long())


@torch.no_grad()
def _continue(model, cache, cont: torch.Tensor) -> torch.Tensor:
    out = model(cont, past_key_values=cache, use_cache=True)
    return out.logits[0]


@torch.no_grad()
def run_frontier(
    model,
    ids: torch.Tensor,
    methods: Sequence[object],
    cfg: FrontierConfig,
    model_name: str = "",
    progress=None,
) -> FrontierResult:
    """Measure ``methods`` on ``cfg.windows`` windows of token ids ``[N]``.

    ``progress``: optional callable ``(n_steps) -> tqdm-like`` used for a progress bar.
    """
    built = [build_method(m) if isinstance(m, str) else m for m in methods]
    starts = window_starts(ids.numel(), cfg)
    stats = [MethodStats(m.spec) for m in built]
    base_nll: list[float] = []
    bar = progress(len(starts) * (len(built) + 1)) if progress else None
    q_pos = _query_positions(cfg.context, cfg.n_queries)
    device = next(model.parameters()).device
    for start in starts:
        win = ids[start : start + cfg.context + cfg.continuation + 1].unsqueeze(0).to(device)
        prefix, cont = win[:, : cfg.context], win[:, cfg.context : cfg.context + cfg.continuation]
        targets = win[0, cfg.context + 1 :]
        cap = capture(model, prefix, q_pos, keep_logits="last")
        ref_logits = _continue(model, copy.deepcopy(cap.cache), cont)
        nll, _ = token_nll_kl(ref_logits, ref_logits, targets)
        base_nll.append(float(nll.mean()))
        if bar:
            bar.update(1)
        for method, st in zip(built, stats):
            d = cap.layers[0].k.shape[-1]
            if getattr(method, "owns_cache", False):  # a peer: its own prefill and cache
                peer = method.run_window(model, prefix, cont)
                results = [LayerResult(k, v, 0) for k, v in zip(peer.keys, peer.values)]
                st.held_bytes += peer.nbytes
                cache, logits = None, peer.logits
            else:
                cache = copy.deepcopy(cap.cache)
                st.held_bytes += method.shared_nbytes(d)
                results = method.compress_layers(cap.layers)
            for i, (layer, res) in enumerate(zip(cap.layers, results)):
                st.held_bytes += res.nbytes
                st.fp16_bytes += fp16_nbytes(layer.k.numel() + layer.v.numel())
                st.numel += layer.k.numel() + layer.v.numel()
                st.attn.add(
                    attention_fidelity(
                        layer.q,
                        layer.q_pos,
                        layer.k,
                        layer.v,
                        res.k_hat,
                        res.v_hat,
                        layer.scaling,
                        layer.sliding_window,
                    )
                )
                e, n = rel_mse(layer.k, res.k_hat)
                st.k_err, st.k_norm = st.k_err + e, st.k_norm + n
                e, n = rel_mse(layer.v, res.v_hat)
                st.v_err, st.v_norm = st.v_err + e, st.v_norm + n
                if cache is not None:
                    held = cache.layers[i]
                    t_l = held.keys.shape[-2]  # sliding layers hold only their window
                    held.keys = res.k_hat[..., -t_l:, :].to(held.keys.dtype).contiguous()
                    held.values = res.v_hat[..., -t_l:, :].to(held.values.dtype).contiguous()
            if cache is not None:
                logits = _continue(model, cache, cont)
            nll, kl = token_nll_kl(logits, ref_logits, targets)
            st.window_nll.append(float(nll.mean()))
            st.window_kl.append(float(kl.mean()))
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    return FrontierResult(model_name, cfg, base_nll, stats)
