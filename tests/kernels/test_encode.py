"""encode_vq: the fused kernel writes exactly what the codec's encode stores (ties documented)."""

from __future__ import annotations

import pytest
import torch

from kvshrink.kernels import encode_vq, layout_of
from kvshrink.kernels.encode import nearest_codeword
from kvshrink.kernels.layout import rotation_matrix

from ..conftest import gaussian_kv
from .vq_stub import StubVQ

STUBS = {
    "tq-b1": (1, 1),
    "tq-b2": (2, 1),
    "tq-b3": (3, 1),
    "tq-b4": (4, 1),
    "fq-k2-b4": (4, 2),
    "fq-k2-b6": (6, 2),
    "fq-k2-b8": (8, 2),
    "fq-k4-b8": (8, 4),
    "fq-k8-b8": (8, 8),
}


def assert_same_codes(x: torch.Tensor, codec, role: str, codes: torch.Tensor, norm: torch.Tensor) -> None:
    """Equal to the codec's encode; a differing index must be a near-tie of the two codewords."""
    packed = codec.encode(x, role)
    # fp32 sums in another order can round a norm to the neighbouring fp16 value, rarely
    want = packed.tensors["norm"].float()
    rel = (norm.float() - want).abs() / want.clamp_min(1e-30)
    assert rel.max() <= 2**-10 and (rel > 0).float().mean() <= 1e-3
    if torch.equal(codes, packed.tensors["codes"]):
        return
    from kvshrink.codecs.primitives.bitpack import unpack_rows

    d = x.shape[-1]
    lay = layout_of(codec, role, d)
    # the tie check runs on CPU, where the codebook and the rotation live (x may be on CUDA)
    got = unpack_rows(codes.cpu(), lay.bits, d // lay.vec)
    want = unpack_rows(packed.tensors["codes"].cpu(), lay.bits, d // lay.vec)
    cb = codec.codebook(d, role).double().cpu()
    xf = x.double().cpu()
    y = (xf / xf.norm(dim=-1, keepdim=True)) @ rotation_matrix(codec, d).double().T
    blocks = y.reshape(*y.shape[:-1], d // lay.vec, lay.vec)
    dist = ((blocks.unsqueeze(-2) - cb) ** 2).sum(-1)  # [..., R, N]
    gap = (dist.gather(-1, got.unsqueeze(-1)) - dist.gather(-1, want.unsqueeze(-1))).abs()
    assert gap.max() < 1e-5, "an index differs by more than a floating-point tie"


@pytest.mark.parametrize("name", list(STUBS))
def test_encode_vq_triton_prefill(name: str) -> None:
    pytest.importorskip("triton")
    codec = StubVQ(*STUBS[name])
    x = gaussian_kv(0, (2, 2, 37, 64)).half()
    for role in ("key", "value"):
        codes, norm = encode_vq(x, codec, role, backend="triton")
        assert_same_codes(x, codec, role, codes, norm)


@pytest.mark.parametrize("name", ["fq-k2-b6", "fq-k2-b8", "fq-k4-b8", "fq-k8-b8"])
@pytest.mark.parametrize("search", ["loop", "mma", "keyed"])
def test_encode_vq_triton_search(name: str, search: str) -> None:
    """Every nearest-codeword search (the CUDA-core loop, tensor-core scores over padded blocks
    with an argmin, or with distance and index keyed in one int) stores the codec's codes;
    37 tokens leave the last program partly masked."""
    pytest.importorskip("triton")
    from kvshrink.kernels.encode.pad import SEARCH_FLAGS

    mma, keyed = SEARCH_FLAGS[search]
    codec = StubVQ(*STUBS[name])
    x = gaussian_kv(3, (2, 2, 37, 64)).half()
    for role in ("key", "value"):
        codes, norm = encode_vq(x, codec, role, backend="triton", mma=mma, keyed=keyed)
        assert_same_codes(x, codec, role, codes, norm)


@pytest.mark.parametrize("name", ["tq-b2", "fq-k2-b4", "fq-k4-b8", "fq-k8-b8"])
@pytest.mark.parametrize("block", [16, 64])
def test_encode_loop_launch_options_store_the_same_codes(name: str, block: int) -> None:
    """The CUDA-core search (coordinates split into thread-local tiles) at other tile sizes and
    warp counts than the default stores what the codec stores."""
    pytest.importorskip("triton")
    codec = StubVQ(*STUBS[name])
    x = gaussian_kv(4, (2, 2, 37, 64)).half()
    codes, norm = encode_vq(
        x, codec, "key", backend="triton", mma=False, keyed=False, block=block, num_warps=4
    )
    assert_same_codes(x, codec, "key", codes, norm)


class _TwiceVQ(StubVQ):
    """Every codeword twice (second half = first half): exact ties on every search."""

    def codebook(self, d: int, role: str) -> torch.Tensor:
        cb = super().codebook(d, role)
        return torch.cat([cb[: len(cb) // 2], cb[: len(cb) // 2]])


def test_keyed_search_picks_the_first_of_tied_codewords() -> None:
    """Exactly tied codewords: the keyed search, like ``torch.argmin``, stores the first."""
    pytest.importorskip("triton")
    from kvshrink.codecs.primitives.bitpack import unpack_rows

    codec = _TwiceVQ(8, 4)
    x = gaussian_kv(5, (1, 2, 24, 64)).half()
    codes, norm = encode_vq(x, codec, "key", backend="triton", mma=True, keyed=True)
    assert_same_codes(x, codec, "key", codes, norm)
    assert int(unpack_rows(codes, 8, 16).max()) < 128


def test_mma_search_chosen_for_large_vector_codebooks() -> None:
    from kvshrink.kernels.encode.pad import mma_ok, mma_supported, pad_codebook

    assert mma_ok(layout_of(StubVQ(8, 8), "key", 128), 128)
    assert not mma_ok(layout_of(StubVQ(8, 4), "key", 128), 128)  # measured: the loop is as fast at k=4
    assert mma_supported(layout_of(StubVQ(8, 4), "key", 128), 128)  # but it can be forced
    assert not mma_ok(layout_of(StubVQ(4, 1), "key", 128), 128)  # scalar levels
    assert not mma_ok(layout_of(StubVQ(4, 8), "key", 128), 128)  # 16 codewords: the loop is cheap
    from kvshrink.kernels.encode.pad import default_search, supported_searches

    assert default_search(layout_of(StubVQ(8, 8), "key", 128), 128) == "keyed"  # measured at k=8, N=256
    assert default_search(layout_of(StubVQ(8, 4), "key", 128), 128) == "loop"
    assert default_search(layout_of(StubVQ(12, 8), "key", 128), 128) == "mma"  # too many codewords to key
    assert supported_searches(layout_of(StubVQ(8, 4), "key", 128), 128) == ["loop", "mma", "keyed"]
    assert supported_searches(layout_of(StubVQ(4, 1), "key", 128), 128) == ["loop"]
    cb = torch.arange(12.0).reshape(4, 3)
    assert pad_codebook(cb) is None  # a 3-wide block does not divide the 16 padded columns
    cb = torch.arange(8.0).reshape(2, 4)
    pad = pad_codebook(cb)
    assert torch.equal(pad[::4], cb.T)  # coordinates where the interleaved zeros put them
    assert torch.equal(pad[1], -0.5 * (cb * cb).sum(-1)) and torch.equal(pad[3], -torch.ones(2))  # keyed
    assert pad[[2, 5, 6, 7, 9, 10, 11, 13, 14, 15]].abs().sum() == 0
    assert torch.equal(pad_codebook(torch.ones(2, 16)), torch.ones(16, 2))  # 16-wide: no spare column


def test_encode_vq_triton_single_token_append() -> None:
    """A decode step's new token lands at each sequence's own position, nothing else is written."""
    pytest.importorskip("triton")
    codec = StubVQ(3)
    x = gaussian_kv(1, (3, 2, 1, 64)).half()
    codes, norm = encode_vq(x, codec, "key", backend="reference")
    cap_codes = torch.zeros(3, 2, 20, codes.shape[-1], dtype=torch.uint8)
    cap_norm = torch.zeros(3, 2, 20, dtype=torch.float16)
    start = torch.tensor([0, 7, 19])
    encode_vq(x, codec, "key", out=(cap_codes, cap_norm), start=start, backend="triton")
    for b, s in enumerate(start.tolist()):
        assert torch.equal(cap_codes[b, :, s], codes[b, :, 0])
        assert torch.equal(cap_norm[b, :, s], norm[b, :, 0])
    assert int((cap_norm != 0).sum()) == 3 * 2


def test_encode_zero_vector_is_finite() -> None:
    pytest.importorskip("triton")
    codec = StubVQ(4)
    x = torch.zeros(1, 1, 16, 64)
    codes, norm = encode_vq(x, codec, "key", backend="triton")
    ref_codes, ref_norm = encode_vq(x, codec, "key", backend="reference")
    assert torch.equal(norm, ref_norm) and torch.equal(codes, ref_codes)


def test_nearest_codeword_first_index_on_ties() -> None:
    cb = torch.tensor([[1.0], [1.0], [-1.0]])
    assert nearest_codeword(torch.tensor([[0.9]]), cb).tolist() == [[0]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(STUBS))
def test_encode_vq_cuda(name: str) -> None:
    codec = StubVQ(*STUBS[name])
    x = gaussian_kv(2, (2, 8, 300, 128)).half().cuda()
    codes, norm = encode_vq(x, codec, "key")
    assert_same_codes(x, codec, "key", codes, norm)
