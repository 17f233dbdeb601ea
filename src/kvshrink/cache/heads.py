"""Retrieval-head search for RazorAttention, run once per model and cached on disk.

The probe (RazorAttention §3, Huawei's Golden-Stick ``RAConfig``): ``length`` seeded random
tokens repeated ``repeats`` times after BOS. A query in repetition ``j >= 1`` at offset ``t``
can look back at the same token in every earlier repetition (its *echo*) and at the token that
followed it there (what an *induction* head copies next). A head's echo and induction scores
are the attention mass it puts on those columns, summed over the earlier repetitions and
averaged over the queries of repetitions ``1..repeats-1``; a KV head takes the max over its
query heads. The paper uses 2500 tokens x 4; the default here is 512 x 4, enough for
induction to show (the second repetition is already copyable) at a fraction of the cost on CPU.

Attention probabilities come from a probe attention function registered for one forward:
it scores tiles of query rows against all keys (never the ``[H, T, T]`` matrix at once) and
returns ordinary causal SDPA output, so the model computes what it always does.

Cache: ``$KVSHRINK_CACHE`` (default ``~/.cache/kvshrink``) ``/heads/<fingerprint>.json``, where
the fingerprint hashes the model config, a strided sample of every weight and the search
settings. JSON, not pickle: ``format`` version, the scores, and a sha256 ``checksum`` of the
payload; a file failing either check is recomputed and replaced (atomic write).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_utils import AttentionInterface

from ..core.atomic import atomic_write
from ..core.errors import ModelError
from ..policies import Policy
from ..policies.razor import RazorAttention, pick_heads
from .install import text_config

__all__ = ["FORMAT", "bind_heads", "cache_path", "head_scores", "search_heads"]

FORMAT = 1
PROBE = "kvshrink_head_probe"
_TILE = 256  # query rows scored at once
_local = threading.local()


def _probe_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Score echo/induction mass of layer ``module.layer_idx``; return causal SDPA output."""
    run = _local.run
    _, h, t, d = query.shape
    hk = key.shape[1]
    scaling = scaling if scaling is not None else d**-0.5
    kr = key.repeat_interleave(h // hk, dim=1).float()
    vr = value.repeat_interleave(h // hk, dim=1)
    cols = torch.arange(t, device=query.device)
    allowed = cols[None, :] <= cols[:, None]
    if sliding_window is not None:
        allowed &= cols[None, :] > cols[:, None] - sliding_window
    length, repeats = run["length"], run["repeats"]
    echo = torch.zeros(h, device=query.device)
    induction = torch.zeros(h, device=query.device)
    q0 = 1 + length  # first query of repetition 1
    for r0 in range(q0, t, _TILE):
        r1 = min(t, r0 + _TILE)
        s = torch.matmul(query[0, :, r0:r1].float() * scaling, kr[0].transpose(-1, -2))  # [H, r, T]
        p = torch.softmax(s.masked_fill(~allowed[r0:r1], float("-inf")), dim=-1)
        qi = torch.arange(r0, r1, device=query.device)
        rep, off = (qi - 1) // length, (qi - 1) % length
        earlier = torch.arange(repeats - 1, device=query.device)
        valid = earlier[None, :] < rep[:, None]  # [r, R-1]
        same = 1 + earlier[None, :] * length + off[:, None]  # the earlier occurrences
        nxt = (same + 1).clamp_max(t - 1)
        for target, acc in ((same, echo), (nxt, induction)):
            got = p.gather(-1, target.expand(h, -1, -1))  # [H, r, R-1]
            acc += (got * valid).sum((-1, -2))
    n_q = t - q0
    run["echo"][module.layer_idx] = (echo / n_q).view(hk, h // hk).amax(-1).tolist()
    run["induction"][module.layer_idx] = (induction / n_q).view(hk, h // hk).amax(-1).tolist()
    mask = allowed if sliding_window is not None else None
    out = F.scaled_dot_product_attention(
        query, kr.to(query.dtype), vr, attn_mask=mask, is_causal=mask is None, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


def search_heads(
    model: torch.nn.Module, length: int = 512, repeats: int = 4, seed: int = 0
) -> dict[str, Any]:
    """Run the probe on ``model``: ``{"echo": [L][Hkv], "induction": [L][Hkv]}`` (no disk cache)."""
    config = text_config(model)
    if length < 2 or repeats < 2:
        raise ModelError(f"head search needs length >= 2 and repeats >= 2, got {length}, {repeats}")
    n_layers, n_kv = config.num_hidden_layers, config.num_key_value_heads
    g = torch.Generator().manual_seed(seed)
    low = 0 if config.vocab_size < 1000 else 100  # skip the special tokens at the start of the vocab
    tokens = torch.randint(low, config.vocab_size, (length,), generator=g)
    bos = config.bos_token_id if config.bos_token_id is not None else int(tokens[0])
    ids = torch.cat([torch.tensor([bos]), tokens.repeat(repeats)])[None].to(next(model.parameters()).device)
    run = {
        "length": length,
        "repeats": repeats,
        "echo": [[0.0] * n_kv for _ in range(n_layers)],
        "induction": [[0.0] * n_kv for _ in range(n_layers)],
    }
    if PROBE not in AttentionInterface._global_mapping:
        AttentionInterface.register(PROBE, _probe_attention)
    before = config._attn_implementation
    _local.run = run
    try:
        model.set_attn_implementation(PROBE)  # type: ignore[operator]
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        model.set_attn_implementation(before)  # type: ignore[operator]
        _local.run = None
    return {"echo": run["echo"], "induction": run["induction"]}


def _fingerprint(model: torch.nn.Module, settings: dict[str, int]) -> str:
    h = hashlib.sha256()
    h.update(text_config(model).to_json_string(use_diff=False).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    for name, p in model.named_parameters():
        flat = p.detach().flatten()
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def cache_path(fingerprint: str) -> Path:
    root = Path(os.environ.get("KVSHRINK_CACHE", Path.home() / ".cache" / "kvshrink"))
    return root / "heads" / f"{fingerprint}.json"


def _checksum(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def head_scores(model: torch.nn.Module, length: int = 512, repeats: int = 4, seed: int = 0) -> dict[str, Any]:
    """:func:`search_heads`, read from the disk cache when a valid entry exists."""
    settings = {"length": length, "repeats": repeats, "seed": seed}
    fp = _fingerprint(model, settings)
    path = cache_path(fp)
    try:
        stored = json.loads(path.read_text())
        payload = stored["payload"]
        if stored.get("format") == FORMAT and stored.get("checksum") == _checksum(payload):
            return payload
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or damaged: search again
    payload = {"fingerprint": fp, "settings": settings, **search_heads(model, length, repeats, seed)}
    record = {"format": FORMAT, "checksum": _checksum(payload), "payload": payload}
    atomic_write(path, json.dumps(record, indent=1, sort_keys=True))
    return payload


def bind_heads(policy: Policy | None, model: torch.nn.Module) -> None:
    """Give a RazorAttention policy without ``heads=`` the retrieval heads of ``model``."""
    if not isinstance(policy, RazorAttention) or policy.retrieval is not None:
        return
    scores = head_scores(model)
    c = policy.config
    policy.bind(
        pick_heads(torch.tensor(scores["induction"]), torch.tensor(scores["echo"]), c.induction, c.echo)
    )
