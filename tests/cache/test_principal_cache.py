"""Keys with their top directions coded apart (``pca=``) inside CompressedCache: generation runs
through the cache's rotated-basis reads, and the stored directions and coefficients are counted."""

from __future__ import annotations

import torch

from ..kernels.test_cache_store import _run as run_generate
from ..policies.tiny import tiny_llama
from .test_keyspace import _padded


def test_generate_with_pca_keys_counts_the_directions() -> None:
    model = tiny_llama(layers=2)
    ids, mask = _padded()
    plain_out, plain = run_generate(model, "fibquant:b=2,k=4+cache:window=8,block=8", ids, mask, steps=4)
    out, cache = run_generate(model, "fibquant:b=2,k=4,pca=2+cache:window=8,block=8", ids, mask, steps=4)
    extra = 0
    for layer in cache.layers:
        for seg in layer.blocks:
            for p in seg.keys or []:
                assert {"pu", "ps", "pc"} <= set(p.tensors)
                extra += sum(p.tensors[n].numel() * p.tensors[n].element_size() for n in ("pu", "ps", "pc"))
    assert extra > 0
    assert cache.memory_report().total - plain.memory_report().total == extra
    assert out.sequences.shape == plain_out.sequences.shape
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(plain_out.scores), atol=0.5, rtol=0.1)
