"""CompressedCache on the CPU: rotation codecs decode through the compiled table scan over one
contiguous store (``kernels=auto``), and match the PyTorch read path (``kernels=torch``)."""

from __future__ import annotations

import copy

import pytest
import torch

from kvshrink.kernels.lut_cpu import available

from ..kernels.test_cache_store import _run as run_generate
from ..policies.tiny import tiny_llama

pytestmark = pytest.mark.skipif(not available(), reason="numba not importable")

SPECS = [
    "fibquant:b=2,k=4+cache:window=8,block=16",
    "fibquant:b=1.5,k=4,vb=1+cache:window=0,block=16",
    "turboquant:b=3+cache:window=8,block=16",
    "layers:at=[1],key=[fibquant:b=1.5,k=4]+fibquant:b=2,k=4+cache:window=8,block=16",
]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2)


def _run(model, spec: str, ids, steps: int = 6, beams: int = 1):
    return run_generate(model, spec, ids, torch.ones_like(ids), steps=steps, beams=beams)


@pytest.mark.parametrize("spec", SPECS)
def test_cpu_store_matches_torch_path(model, spec: str) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 97, (2, 45), generator=g)
    ref, ref_cache = _run(model, spec + ",kernels=torch", ids)
    out, cache = _run(model, spec, ids)
    for layer in cache.layers:
        assert layer.store is not None and layer.store.n == sum(b.size for b in layer.blocks) > 0
    assert all(layer.store is None for layer in ref_cache.layers)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=1e-4, rtol=1e-4)
    # bytes: the same blocks, plus the store's unused capacity counted as held
    ours, theirs = cache.memory_report(), ref_cache.memory_report()
    assert ours.nbytes >= theirs.nbytes
    assert ours.nbytes - theirs.nbytes == sum(layer.store.slack_nbytes() for layer in cache.layers)


def test_cpu_store_beams_and_deepcopy(model) -> None:
    spec = "fibquant:b=2,k=4+cache:window=8,block=16"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (1, 40), generator=g)
    ref, _ = _run(model, spec + ",kernels=torch", ids, steps=5, beams=3)
    out, cache = _run(model, spec, ids, steps=5, beams=3)
    assert cache.layers[0].store is not None and cache.layers[0].store.batch == 3
    assert torch.equal(out.sequences, ref.sequences)
    twin = copy.deepcopy(cache)
    nxt = torch.randint(1, 97, (3, 1), generator=g)
    with torch.no_grad():
        a = model(input_ids=nxt, past_key_values=cache).logits
        b = model(input_ids=nxt, past_key_values=twin).logits
    assert torch.equal(a, b)


def test_int4_keeps_the_torch_path_on_cpu(model) -> None:
    ids = torch.randint(1, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    _, cache = _run(model, "int4+cache:window=8,block=16", ids, steps=2)
    assert all(layer.store is None for layer in cache.layers)
