"""CompressedCache decoding through the Triton kernels (the interpreter on CPU) matches the
PyTorch read path on the same model, prompts and codec: greedy tokens, logits, beams, padding."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from kvshrink.cache import CompressedCache
from kvshrink.cache.segment import encode_segment
from kvshrink.cache.store import PackedStore
from kvshrink.codecs import make_codec
from kvshrink.core import InputError, SpecError

from ..policies.tiny import tiny_llama

# A CPU model through the interpreter: on a GPU machine (no TRITON_INTERPRET set) the forced
# kernels would refuse the CPU tensors, so the module asks for the interpreter explicitly there.
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU model through the Triton interpreter: run with TRITON_INTERPRET=1 on a GPU machine",
)

SPECS = [
    "int4+cache:window=8,block=16",
    "kivi:b=2+cache:window=8,block=32",
    "turboquant:b=4+cache:window=8,block=16",
    "fibquant:b=2,k=4+cache:window=0,block=16",
]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2)


def _run(model, spec: str, ids, mask, steps: int = 5, beams: int = 1):
    cache = CompressedCache(model, spec)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            past_key_values=cache,
            max_new_tokens=steps,
            do_sample=False,
            num_beams=beams,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    return out, cache


@pytest.mark.parametrize("spec", SPECS)
def test_kernel_decode_matches_torch_path(model, spec: str) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 97, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    ref, _ = _run(model, spec + ",kernels=torch", ids, mask)
    out, cache = _run(model, spec + ",kernels=triton", ids, mask)
    store = cache.layers[0].store
    assert store is not None and store.n == sum(b.size for b in cache.layers[0].blocks) > 0
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), atol=2e-3, rtol=2e-3)


def test_beams_reorder_the_store(model) -> None:
    spec = "turboquant:b=4+cache:window=8,block=16"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (1, 36), generator=g)
    ref, _ = _run(model, spec + ",kernels=torch", ids, torch.ones_like(ids), steps=4, beams=2)
    out, cache = _run(model, spec + ",kernels=triton", ids, torch.ones_like(ids), steps=4, beams=2)
    assert cache.layers[0].store is not None and cache.layers[0].store.batch == 2
    assert torch.equal(out.sequences, ref.sequences)


def test_left_padding_falls_back_to_torch_reads(model) -> None:
    """A block with padding slots cannot be read by the kernel: the layer drops its store and the
    PyTorch path (which masks empty slots) reads the same data."""
    spec = "int4+cache:window=8,block=16"
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 97, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ref, _ = _run(model, spec + ",kernels=torch", ids, mask)
    out, cache = _run(model, spec + ",kernels=triton", ids, mask)
    assert cache.layers[0].store is None
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("spec", ["int4", "kivi:b=2", "fibquant:b=2,k=4"])
def test_store_views_hold_what_the_codec_encodes(spec: str) -> None:
    """Blocks packed into the store (in one call, across growth) read back as the codec's own
    per-row encode of the same tokens."""
    from kvshrink.cache.segment import Segment

    codec = make_codec(spec + (",residual=0" if spec.startswith("kivi") else ""))
    g = torch.Generator().manual_seed(3)
    b, h, d, block = 2, 3, 32, 32
    store = PackedStore(codec, b, h, d, block, "cpu", torch.float32)
    blocks: list[Segment] = []
    dense = []
    for n_pieces in (1, 3, 2):  # growth re-points earlier blocks' views
        pieces = []
        for _ in range(n_pieces):
            k, v = torch.randn(b, h, block, d, generator=g), torch.randn(b, h, block, d, generator=g)
            c0 = sum(s.size for s in blocks) + sum(p.size for p in pieces)
            pos = torch.arange(c0, c0 + block, dtype=torch.int32).view(1, 1, -1)
            pieces.append(Segment(pos=pos, lo=c0, hi=c0 + block - 1, full=True, c0=c0, k=k, v=v))
        dense += [encode_segment(codec, p) for p in pieces]
        blocks += store.append(pieces, blocks)
    assert store.n == len(blocks) * block and store.cap >= store.n
    for seg, ref in zip(blocks, dense):
        for role in ("keys", "values"):
            for got, want in zip(getattr(seg, role), getattr(ref, role)):
                for name, t in want.tensors.items():
                    assert torch.equal(got.tensors[name], t), (spec, role, name)
                torch.testing.assert_close(codec.decode(got), codec.decode(want))


def test_memory_report_counts_store_slack(model) -> None:
    """Capacity grows by a 32nd once that exceeds a block: the unused tail is reported held."""
    ids = torch.randint(1, 97, (1, 200), generator=torch.Generator().manual_seed(4))
    _, torch_cache = _run(model, "int4+cache:window=8,block=4,kernels=torch", ids, torch.ones_like(ids), 6)
    _, cache = _run(model, "int4+cache:window=8,block=4,kernels=triton", ids, torch.ones_like(ids), 6)
    assert cache.layers[0].store.cap > cache.layers[0].store.n
    slack = sum(layer.store.slack_nbytes() for layer in cache.layers)
    assert slack > 0
    assert cache.memory_report().total == torch_cache.memory_report().total + slack


def test_deepcopy_keeps_decoding_like_the_original(model) -> None:
    spec = "turboquant:b=4+cache:window=8,block=16,kernels=triton"
    ids = torch.randint(1, 97, (1, 40), generator=torch.Generator().manual_seed(5))
    cache = CompressedCache(model, spec)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        twin = copy.deepcopy(cache)
        nxt = torch.tensor([[7]])
        a = model(nxt, past_key_values=cache).logits
        b = model(nxt, past_key_values=twin).logits
    torch.testing.assert_close(a, b)


def test_forced_kernels_refuse_what_they_cannot_serve(model, monkeypatch) -> None:
    ids = torch.randint(1, 97, (1, 20))
    with pytest.raises(InputError, match="token policy snapkv"):
        _run(model, "snapkv:ratio=0.5+int4+cache:kernels=triton", ids, torch.ones_like(ids), 1)
    with pytest.raises(InputError, match="fp16 residual"):
        _run(model, "kivi:b=2+cache:block=16,kernels=triton", ids, torch.ones_like(ids), 1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InputError, match="TRITON_INTERPRET=1"):
        _run(model, "int4+cache:kernels=triton", ids, torch.ones_like(ids), 1)
    with pytest.raises(SpecError, match="auto, triton or torch"):
        CompressedCache(model, "int4+cache:kernels=cuda")
