"""``white=r`` in CompressedCache: keys held as A·k and read with A⁻¹·q.

The basis must not change attention (a lossless codec gives the same tokens with and without it,
through left padding and beams), must be fitted per batch row from that row's own tokens (a
prompt alone and inside a padded batch get the same basis), must be counted in the bytes, and
on the real model must lower the error a 2-bit codec adds.
"""

from __future__ import annotations

import pytest
import torch

from kvshrink.cache import CompressedCache
from kvshrink.cache.config import parse_cache_spec
from kvshrink.cache.keyspace import KeyTransform

from ..kernels.test_cache_store import _run as run_generate
from ..policies.tiny import VOCAB, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=3)


def _padded(n: int = 2, t: int = 40, pad: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (n, t), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = 0, 0
    return ids, mask


def test_spec_keeps_white_and_the_layers_pack_plain() -> None:
    parsed = parse_cache_spec("fibquant:b=2,k=4,white=4,wshrink=0.2+cache:window=8")
    assert str(parsed) == "fibquant:b=2,k=4,white=4,wshrink=0.2+cache:window=8"
    assert parsed.build_codec().spec == "fibquant:b=2,k=4,wshrink=0.2"
    assert parsed.key_transforms(2) == [(4, 0.2), (4, 0.2)]
    plan = parse_cache_spec("layers:at=[1],codec=[fibquant:b=3,k=4,white=2]+fibquant:b=2,k=4")
    assert plan.key_transforms(3) == [(0, 0.1), (2, 0.1), (0, 0.1)]


@pytest.mark.parametrize("beams", [1, 2])
def test_basis_leaves_attention_unchanged(model, beams: int) -> None:
    """fp16 packing, the basis forced on every layer: the same tokens and near-equal scores."""
    ids, mask = _padded()
    spec = "fp16+cache:window=8,block=8"
    ref, _ = run_generate(model, spec, ids, mask, steps=6, beams=beams)

    orig = CompressedCache.__init__

    def with_basis(self, *a, **kw):
        orig(self, *a, **kw)
        for layer in self.layers:
            layer.white = (4, 0.1)

    CompressedCache.__init__ = with_basis  # type: ignore[method-assign]
    try:
        out, cache = run_generate(model, spec, ids, mask, steps=6, beams=beams)
    finally:
        CompressedCache.__init__ = orig  # type: ignore[method-assign]
    assert all(layer.kt is not None for layer in cache.layers)
    assert cache.layers[0].kt.u.shape == (2 * beams, cache.layers[0].heads, 4, cache.head_dim)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=2e-2, rtol=2e-2)


def test_basis_is_fitted_per_row_and_ignores_padding(model) -> None:
    ids, mask = _padded()
    spec = "turboquant:b=3,white=4+cache:window=8,block=8"
    both, cache2 = run_generate(model, spec, ids, mask, steps=4)
    alone, cache1 = run_generate(model, spec, ids[1:, 7:], mask[1:, 7:], steps=4)
    for l2, l1 in zip(cache2.layers, cache1.layers):
        torch.testing.assert_close(l2.kt.u[1:].abs(), l1.kt.u.abs(), atol=1e-4, rtol=0)  # sign-free
        torch.testing.assert_close(l2.kt.s[1:], l1.kt.s, atol=1e-4, rtol=1e-4)
    assert torch.equal(both.sequences[1, -4:], alone.sequences[0, -4:])


def test_basis_bytes_are_counted(model) -> None:
    ids, mask = _padded()
    _, plain = run_generate(model, "turboquant:b=3+cache:window=8,block=8", ids, mask, steps=2)
    _, white = run_generate(model, "turboquant:b=3,white=4+cache:window=8,block=8", ids, mask, steps=2)
    extra = sum(layer.kt.nbytes() for layer in white.layers)
    heads, d = white.layers[0].heads, white.head_dim
    assert extra == len(white.layers) * 2 * heads * 4 * (d + 1) * 4  # fp32 u and s per row, head
    assert white.memory_report().total - plain.memory_report().total == extra


def test_transform_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 10, 16, generator=g), torch.randn(2, 3, 10, 16, generator=g) * 3
    kt = KeyTransform.fit(q, k, None, 4, 0.1)
    scores = q.reshape(2, 3, 20, 16) @ k.transpose(-1, -2)
    moved = kt.queries(q).reshape(2, 3, 20, 16) @ kt.keys(k).transpose(-1, -2)
    torch.testing.assert_close(moved, scores, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_basis_cuts_the_two_bit_error_on_smollm2(smollm2) -> None:
    """Teacher-forced continuation after a 768-token essay prompt: KL from DynamicCache's logits."""
    from kvshrink.data import load_text

    model, tok = smollm2
    ids = tok(load_text()[:20000], return_tensors="pt").input_ids[:, :832]
    prompt, cont = ids[:, :768], ids[:, 768:]

    def logits(cache):
        with torch.no_grad():
            model(prompt, past_key_values=cache, use_cache=True)
            out = model(cont, past_key_values=cache, use_cache=True).logits
        if isinstance(cache, CompressedCache):
            cache.uninstall()
        return out.float().log_softmax(-1)

    from transformers import DynamicCache

    ref = logits(DynamicCache())
    kl = {}
    for spec in ("fibquant:b=2,k=4", "fibquant:b=2,k=4,white=4"):
        lp = logits(CompressedCache(model, spec + "+cache:window=16,block=64"))
        kl[spec] = float((ref.exp() * (ref - lp)).sum(-1).mean())
    assert kl["fibquant:b=2,k=4,white=4"] < 0.8 * kl["fibquant:b=2,k=4"], kl
