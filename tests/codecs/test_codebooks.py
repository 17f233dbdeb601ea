"""Codebooks: the exact scalar table, FibQuant's start and Lloyd refinement, determinism, disk cache."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from kvshrink.codecs.primitives import codebooks as cb
from kvshrink.core import InputError

# sha256 of the float32 bytes of small codebooks, recorded once. Same spec ⇒ same bytes on any
# machine; if the builder changes on purpose, bump codebooks.FORMAT and record the new values.
HASHES = {
    (16, 2, 16): "b5e5d86028437d22eede2490ee464ed4d1435fd18ed42776fbffe4dbeac0ffb3",
    (32, 4, 32): "32c6842a268439f6c558ca2cd915d5360bd755a311513962512b4978acd688e8",
    (16, 1, 4): "cd319143d23decc0ed9e697b150ae8ed1e2959db8dddd67909b3ecc6d269a6cf",
}


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr, dtype="<f4").tobytes()).hexdigest()


def _mse(book: np.ndarray, d: int, m: int = 100_000, seed: int = 7) -> float:
    """E‖u-û‖² over unit u in R^d when every k-block goes to its nearest codeword."""
    k = book.shape[1]
    x = cb.source_samples(d, k, m, np.random.default_rng(seed))
    dist, _ = cKDTree(book.astype(np.float64)).query(x)
    return float((dist**2).mean()) * d / k


# -- the scalar table (TurboQuant, FibQuant k=1) -------------------------------------------------
@pytest.mark.parametrize("b,ref", [(1, 0.360), (2, 0.115), (3, 0.0334)])
def test_scalar_mse_matches_codecs_md(b: int, ref: float) -> None:
    assert cb.scalar_mse(64, cb.scalar_levels(64, 2**b)) == pytest.approx(ref, rel=0.03)


def test_scalar_levels_reference_values() -> None:
    d = 64
    one = cb.scalar_levels(d, 2)
    assert one[1] == pytest.approx(math.sqrt(2 / (math.pi * d)), rel=0.01)  # ±√(2/(πd))
    two = cb.scalar_levels(d, 4) * math.sqrt(d)
    # the paper's Gaussian limit is ±0.453/√d, ±1.51/√d; the exact Beta at d=64 gives 0.452, 1.500
    assert two[2:] == pytest.approx([0.452, 1.500], abs=0.002)
    for n in (2, 3, 16, 256):
        c = cb.scalar_levels(d, n)
        assert np.all(np.diff(c) > 0) and np.allclose(c, -c[::-1])


def test_scalar_mse_closed_form_matches_sampling() -> None:
    c = cb.scalar_levels(64, 8)
    sampled = _mse(c[:, None], 64, m=200_000)
    assert cb.scalar_mse(64, c) == pytest.approx(sampled, rel=0.01)


# -- FibQuant's radial-angular start ------------------------------------------------------------
def test_radii_follow_the_companded_beta_law() -> None:
    d, n = 64, 32
    assert cb.beta_param(d, 2) == d / 4
    rho = np.linalg.norm(cb.init_codebook(d, 2, n), axis=1)
    closed = np.sqrt(1 - (1 - (np.arange(1, n + 1) - 0.5) / n) ** (4 / d))  # k=2 closed form
    assert np.allclose(rho, closed)


@pytest.mark.parametrize("k", [2, 3, 4, 6, 8])
def test_directions_are_unit_and_spread(k: int) -> None:
    c = cb.init_codebook(64, k, 512)
    rho = np.linalg.norm(c, axis=1)
    dirs = c / rho[:, None]
    assert np.allclose(np.linalg.norm(dirs, axis=1), 1)
    assert np.abs(dirs.mean(0)).max() < 0.1  # quasi-uniform: no preferred direction
    if k == 3:  # the pitfall of codecs.md §1.2: z must not track the radius
        assert abs(np.corrcoef(rho, dirs[:, 2])[0, 1]) < 0.1


def test_lloyd_refines_and_never_hurts() -> None:
    d, k, n = 32, 2, 16
    init = cb.build_codebook(d, k, n, lloyd=False)
    assert np.array_equal(init, cb.init_codebook(d, k, n).astype(np.float32))
    done = cb.build_codebook(d, k, n)
    assert _mse(done, d) < 0.9 * _mse(init, d)
    # random directions start worse but Lloyd still lands close
    rand = cb.build_codebook(d, k, n, dirs="random")
    assert _mse(rand, d) < _mse(init, d)


def test_empty_cells_are_repaired() -> None:
    x = cb.source_samples(32, 2, 5000, np.random.default_rng(0))
    c = np.vstack([x[:7], [[5.0, 5.0]]])  # codeword 7 is far from every sample
    idx, d2 = cb._assign(c, x, 0.0)
    new = cb._update(c, x, idx, d2)
    assert np.linalg.norm(new[7]) < 1  # moved onto a sample of the worst cell


# -- determinism and the disk cache -------------------------------------------------------------
@pytest.mark.parametrize("args", list(HASHES), ids=str)
def test_bit_identical_builds(args: tuple[int, int, int]) -> None:
    assert _digest(cb.build_codebook(*args)) == HASHES[args]


def test_disk_cache_round_trip_and_repair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSHRINK_CACHE", str(tmp_path))
    cb.clear_cache()
    args = (16, 1, 4)  # k=1 builds in milliseconds; the file format is the same for every k
    path = cb.cache_path(*args, 0, "fib", True)
    assert path.parent == tmp_path / "codebooks" and f"v{cb.FORMAT}" in path.name
    book = cb.codebook(*args).numpy()
    raw = path.read_bytes()
    head, data = raw.split(b"\n", 1)
    header = json.loads(head)  # a JSON header, then raw little-endian float32: no pickle
    assert header["sha256"] == hashlib.sha256(data).hexdigest() and header["dtype"] == "<f4"
    assert header["key"] == {"d": 16, "k": 1, "n": 4, "seed": 0, "dirs": "fib", "lloyd": 1}
    assert data == book.astype("<f4").tobytes() and _digest(book) == HASHES[args]
    assert not list(path.parent.glob("*.tmp"))  # the atomic write left no temp file

    cb.clear_cache()
    assert np.array_equal(cb.codebook(*args).numpy(), book)  # loaded from disk

    for corrupt in (raw[:-3], raw[:-4] + b"\x00\x00\x80\x7f", b"garbage", head + b"\n" + data[::-1]):
        path.write_bytes(corrupt)
        cb.clear_cache()
        assert np.array_equal(cb.codebook(*args).numpy(), book)  # rebuilt ...
        assert path.read_bytes() == raw  # ... and the file repaired
    cb.clear_cache()


def test_cache_disabled_builds_identically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSHRINK_CACHE", str(tmp_path))
    cb.clear_cache()
    a = cb.codebook(32, 4, 32, cache=False).numpy()
    cb.clear_cache()
    b = cb.codebook(32, 4, 32, cache=False).numpy()
    assert not (tmp_path / "codebooks").exists()
    assert _digest(a) == _digest(b) == HASHES[(32, 4, 32)]
    cb.clear_cache()


def test_bad_arguments() -> None:
    with pytest.raises(InputError, match="must exceed the block size"):
        cb.init_codebook(4, 4, 16)
    with pytest.raises(InputError, match=r"N must be in 2\.\.65536"):
        cb.build_codebook(64, 2, 70000)
    with pytest.raises(InputError, match="valid: fib, random"):
        cb.init_codebook(64, 2, 16, dirs="lattice")
