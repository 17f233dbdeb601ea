"""Codebooks matched to the exact law of rotated unit vectors (TurboQuant tables, FibQuant blocks).

After normalize + Haar rotation, a block z of k coordinates of a unit vector in R^d has density
∝ (1-‖z‖²)^((d-k-2)/2) on the unit k-ball (codecs.md §1.1): ‖z‖² ~ Beta(k/2, (d-k)/2), direction
uniform. Every codebook here depends only on (d, k, N, seed, variant), never on model data.

- :func:`scalar_levels`: 1-D Lloyd–Max on the exact coordinate marginal (k=1). The cell masses
  and first moments have closed forms (regularized incomplete beta), so the table is exact, not
  sampled: the density is log-concave for d ≥ 3, so Lloyd–Max has a unique optimum.
- :func:`init_codebook`: FibQuant's radial–angular start: Beta-quantile radii with the
  Bennett–Gersho exponent β = 1 + k(d-k-2)/(2(k+2)) times quasi-uniform directions.
- :func:`build_codebook`: that start refined by multi-restart Lloyd on ≥ 20N exact samples.
- :func:`codebook`: memory + disk cache under ``$KVSHRINK_CACHE/codebooks`` (default
  ``~/.cache/kvshrink/codebooks``): one JSON header line with a sha256, then raw little-endian
  float32; no pickle, so a cache file cannot run code. Written atomically (temp file +
  ``os.replace``); a file that fails any check is rebuilt. ``FORMAT`` is in every key: bump it
  whenever the builder changes, so stale files are never read.

Nearest-codeword search during training uses scipy's cKDTree: with k ≤ 8 columns a brute-force
matmul is memory-bound (~10⁸ scores/s on 2 cores), 10-30× slower than the tree. The builder is
deterministic: the same arguments give the same bytes (float64 throughout, cast at the end).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ...core.errors import InputError
from ...core.seed import derive_seed

__all__ = [
    "DIRECTIONS",
    "FORMAT",
    "beta_param",
    "build_codebook",
    "cache_path",
    "clear_cache",
    "codebook",
    "init_codebook",
    "scalar_levels",
    "scalar_mse",
    "source_samples",
]

DIRECTIONS: tuple[str, ...] = ("fib", "random")
FORMAT = 1  # bump when the builder or the file layout changes
MAX_N = 65536
_GOLDEN = (1 + math.sqrt(5)) / 2


# -- the exact scalar marginal (k = 1) ---------------------------------------------------------
def _tail(t: np.ndarray, d: int) -> np.ndarray:
    """P(T > |t|) for one coordinate T of a uniform unit vector in R^d (accurate in the tails)."""
    from scipy import special  # scipy loads only when a codebook is built (~0.5 s of imports)

    return 0.5 * special.betainc((d - 1) / 2, 0.5, np.clip(1.0 - t * t, 0.0, 1.0))


def _cell_stats(edges: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Mass and first moment of each cell [edges[i], edges[i+1]] under the exact marginal."""
    g = _tail(edges, d)
    a, b = edges[:-1], edges[1:]
    ga, gb = g[:-1], g[1:]
    mass = np.where(b <= 0, gb - ga, np.where(a >= 0, ga - gb, 1.0 - ga - gb))
    # ∫ t (1-t²)^((d-3)/2) dt = -(1-t²)^((d-1)/2) / (d-1), times the normalizer C
    log_c = math.lgamma(d / 2) - 0.5 * math.log(math.pi) - math.lgamma((d - 1) / 2)
    w = np.clip(1.0 - edges * edges, 0.0, 1.0) ** ((d - 1) / 2)
    moment = math.exp(log_c) / (d - 1) * (w[:-1] - w[1:])
    return np.maximum(mass, 0.0), moment


def _check_d(d: int, k: int) -> None:
    if d < 2 or (k > 1 and d <= k):
        raise InputError(f"codebook: head dim d={d} must exceed the block size k={k} (and be >= 2)")


@functools.lru_cache(maxsize=256)
def _scalar_levels(d: int, n: int, init: tuple[float, ...] | None) -> np.ndarray:
    c = np.array(init) if init is not None else _companded_scalar(d, n)
    # Converged to 1e-15 for N ≤ 16 (TurboQuant's tables); for large N the companded start is
    # already within 0.05% of the optimum MSE and the extreme levels creep for thousands of
    # iterations, so the work is capped (N=256: MSE within 0.01% of 20000 iterations).
    for _ in range(max(50, min(2000, 4_000_000 // n))):
        edges = np.concatenate(([-1.0], (c[1:] + c[:-1]) / 2, [1.0]))
        mass, moment = _cell_stats(edges, d)
        new = np.where(mass > 1e-300, moment / np.maximum(mass, 1e-300), (edges[:-1] + edges[1:]) / 2)
        delta = float(np.max(np.abs(new - c)))
        c = new
        if delta < 1e-15:
            break
    c.setflags(write=False)
    return c


def scalar_levels(d: int, n: int) -> np.ndarray:
    """The ``n`` Lloyd–Max levels (sorted, float64) for one coordinate of a rotated unit vector in R^d."""
    _check_d(d, 1)
    if not 2 <= n <= MAX_N:
        raise InputError(f"scalar codebook: levels must be in 2..{MAX_N}, got {n}")
    return _scalar_levels(d, n, None).copy()


def scalar_mse(d: int, levels: np.ndarray) -> float:
    """Exact E‖u-û‖² over unit u in R^d when every coordinate is rounded to the nearest level."""
    c = np.sort(np.asarray(levels, dtype=np.float64))
    edges = np.concatenate(([-1.0], (c[1:] + c[:-1]) / 2, [1.0]))
    mass, moment = _cell_stats(edges, d)
    # E(t-c)² = E t² - 2 Σ c·moment + Σ c²·mass, E t² = 1/d
    return float(d * (1.0 / d - 2 * np.sum(c * moment) + np.sum(c * c * mass)))


# -- FibQuant's radial-angular initialization ---------------------------------------------------
def beta_param(d: int, k: int) -> float:
    """β_{d,k} = 1 + k(d-k-2)/(2(k+2)): codeword radii² ~ Beta(k/2, β) (Bennett–Gersho companding)."""
    return 1.0 + k * (d - k - 2) / (2 * (k + 2))


def _companded_scalar(d: int, n: int) -> np.ndarray:
    """k=1 start: quantiles of the symmetric law with t² ~ Beta(1/2, β) (sorted)."""
    p = (np.arange(1, n + 1) - 0.5) / n
    from scipy import special

    mag = np.sqrt(special.betaincinv(0.5, beta_param(d, 1), np.abs(2 * p - 1)))
    return np.sign(p - 0.5) * mag


def _kronecker(n: int, dim: int) -> np.ndarray:
    """Roberts' generalized-golden-ratio points frac(½ + i·α), i = 1..n, in [0,1)^dim."""
    g = 2.0
    for _ in range(100):  # Newton on x^(dim+1) = x + 1
        g -= (g ** (dim + 1) - g - 1) / ((dim + 1) * g**dim - 1)
    alpha = g ** -np.arange(1, dim + 1, dtype=np.float64)
    i = np.arange(1, n + 1, dtype=np.float64)[:, None]
    return np.mod(0.5 + i * alpha, 1.0)


def _directions(k: int, n: int, dirs: str, seed: int) -> np.ndarray:
    """``n`` quasi-uniform (``fib``) or random unit directions in R^k, ``[n, k]``."""
    if dirs == "random":
        rng = np.random.default_rng(derive_seed("codebook-dirs", k, n, seed))
        g = rng.standard_normal((n, k))
        return g / np.linalg.norm(g, axis=1, keepdims=True)
    if k == 2:  # golden-angle spiral: with growing radii, Vogel's sunflower
        theta = 2 * math.pi * np.arange(1, n + 1) * (1 - 1 / _GOLDEN)
        return np.stack((np.cos(theta), np.sin(theta)), axis=1)
    if k == 3:  # Fibonacci sphere from a 2-D Roberts point: z no longer tracks the radius
        uv = _kronecker(n, 2)
        z, theta = 1 - 2 * uv[:, 0], 2 * math.pi * uv[:, 1]
        s = np.sqrt(np.clip(1 - z * z, 0, 1))
        return np.stack((s * np.cos(theta), s * np.sin(theta), z), axis=1)
    from scipy import special

    g = special.ndtri(np.clip(_kronecker(n, k), 1e-12, 1 - 1e-12))
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def init_codebook(d: int, k: int, n: int, seed: int = 0, dirs: str = "fib") -> np.ndarray:
    """FibQuant's start ``[n, k]`` float64: radius ρ_i = √BetaInv(k/2, β)((i-½)/n) times direction i."""
    _check_d(d, k)
    if dirs not in DIRECTIONS:
        raise InputError(f"unknown direction set {dirs!r}; valid: {', '.join(DIRECTIONS)}")
    if k == 1:
        c = _companded_scalar(d, n)
        if dirs == "random":  # signs drawn at random instead of alternating by quantile
            rng = np.random.default_rng(derive_seed("codebook-dirs", 1, n, seed))
            c = np.sort(np.abs(c) * rng.choice([-1.0, 1.0], size=n))
        return c[:, None]
    p = (np.arange(1, n + 1) - 0.5) / n
    from scipy import special

    rho = np.sqrt(special.betaincinv(k / 2, beta_param(d, k), p))
    return rho[:, None] * _directions(k, n, dirs, seed)


# -- Lloyd refinement on samples of the exact source --------------------------------------------
def source_samples(d: int, k: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """``m`` exact draws ``[m, k]`` of k coordinates of a uniform unit vector in R^d.

    Same law as normalizing a Gaussian in R^d and keeping k coordinates: the other d-k squares
    sum to a χ²_{d-k} = 2·Gamma((d-k)/2), drawn directly instead of as d-k normals.
    """
    g = rng.standard_normal((m, k))
    rest = 2.0 * rng.standard_gamma((d - k) / 2, size=m)
    return g / np.sqrt((g * g).sum(1) + rest)[:, None]


def _schedule(k: int, n: int) -> tuple[int, int, int, float]:
    """(samples, iterations, restarts, eps) from (k, N) only, so the build stays deterministic.

    A Lloyd pass costs samples × one tree search, which grows with N and steeply with k (about
    0.5 µs at k=4, 20 µs at k=8, N=65536): large codebooks get fewer passes, one restart and an
    approximate search (returned distance ≤ (1+eps)× nearest): at k=8 the trained codebooks'
    test MSE was the same with eps=0, 1 and 2 (within 0.1%), and eps=2 searches ~10× faster.
    Budget: < 30 s on 2 cores for any d ≤ 256, k ≤ 8, N ≤ 65536 (12 s measured for the largest).
    """
    m = max(20 * n, 1 << 16)
    if n <= 256:
        return m, (24 if k <= 4 else 12 if k <= 6 else 8), 2, 0.0
    if n <= 4096:
        return m, (15 if k <= 4 else 8 if k <= 6 else 4), 1, (0.0 if k <= 4 else 2.0)
    return m, (3 if k <= 3 else 2 if k <= 4 else 1), 1, (0.5 if k <= 3 else 1.0 if k <= 4 else 2.0)


_EVAL = 1 << 17  # candidates are compared on the first _EVAL training samples


def _workers() -> int:
    """Threads for the tree search: the cores this process may run on (not all of the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else -1


def _assign(c: np.ndarray, x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Nearest codeword (index, squared distance) of each sample."""
    if c.shape[1] == 1:  # sorted scalar codebook: exact and fast by bisection
        order = np.argsort(c[:, 0], kind="stable")
        cs = c[order, 0]
        j = np.clip(np.searchsorted((cs[1:] + cs[:-1]) / 2, x[:, 0]), 0, len(cs) - 1)
        return order[j], (x[:, 0] - cs[j]) ** 2
    from scipy.spatial import cKDTree

    tree = cKDTree(c, leafsize=32, balanced_tree=False)
    dist, idx = tree.query(x, k=1, eps=eps, workers=_workers())
    return idx, dist * dist


def _update(c: np.ndarray, x: np.ndarray, idx: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """Centroid step; an empty cell takes the worst-served sample of the highest-distortion cell."""
    n, k = c.shape
    count = np.bincount(idx, minlength=n).astype(np.float64)
    sums = np.stack([np.bincount(idx, weights=x[:, j], minlength=n) for j in range(k)], axis=1)
    new = np.where(count[:, None] > 0, sums / np.maximum(count, 1)[:, None], c)
    empty = np.flatnonzero(count == 0)
    if empty.size:
        dist = np.bincount(idx, weights=d2, minlength=n)
        donors = np.argsort(-dist, kind="stable")[: empty.size]
        for e, cell in zip(empty, donors):
            members = np.flatnonzero(idx == cell)
            new[e] = x[members[np.argmax(d2[members])]]
    return new


def _lloyd(c: np.ndarray, x: np.ndarray, iters: int, eps: float) -> tuple[np.ndarray, float]:
    """Lloyd from ``c``; returns the best codebook seen (``c`` itself if nothing beats it) and its MSE.

    Every iteration assigns all samples; the codebook after the last update is only scored on
    the evaluation subset, and all candidates are compared there.
    """
    best, best_mse = c, math.inf
    for it in range(iters + 1):
        last = it == iters
        idx, d2 = _assign(c, x[:_EVAL] if last else x, eps)
        mse = float(d2[:_EVAL].mean())
        if mse < best_mse:
            gain, best, best_mse = best_mse - mse, c, mse
            if it and gain < 1e-4 * mse:
                break
        if last:
            break
        c = _update(c, x, idx, d2)
    return best, best_mse


def build_codebook(
    d: int, k: int, n: int, seed: int = 0, dirs: str = "fib", lloyd: bool = True
) -> np.ndarray:
    """FibQuant codebook ``[n, k]`` float32 for blocks of k rotated coordinates in R^d (no cache).

    k=1 is the scalar specialization: exact Lloyd–Max on the marginal (from the companded start).
    Otherwise the radial–angular start is refined by Lloyd on ≥ 20n exact samples with R
    restarts (restart 0 from the start itself, the others from jittered copies of the best so
    far), keeping the lowest training MSE, so the result is never worse than the start on those
    samples.
    """
    if not 2 <= n <= MAX_N:
        raise InputError(f"codebook size N must be in 2..{MAX_N}, got {n}")
    c0 = init_codebook(d, k, n, seed, dirs)
    if not lloyd:
        return c0.astype(np.float32)
    if k == 1:
        start = None if dirs == "fib" else tuple(float(v) for v in c0[:, 0])
        return np.asarray(_scalar_levels(d, n, start), dtype=np.float32)[:, None]
    m, iters, restarts, eps = _schedule(k, n)
    rng = np.random.default_rng(derive_seed("codebook-lloyd", d, k, n, seed, dirs))
    x = source_samples(d, k, m, rng)
    best, best_mse = _lloyd(c0, x, iters, eps)
    scale = math.sqrt(best_mse / k)
    for _ in range(1, restarts):
        start = best + 0.5 * scale * rng.standard_normal(best.shape)
        cand, mse = _lloyd(start, x, max(iters // 2, 1), eps)
        if mse < best_mse:
            best, best_mse = cand, mse
    return best.astype(np.float32)


# -- disk cache ---------------------------------------------------------------------------------
def cache_path(d: int, k: int, n: int, seed: int, dirs: str, lloyd: bool) -> Path:
    """Where the codebook of these arguments is cached."""
    root = Path(os.environ.get("KVSHRINK_CACHE") or Path.home() / ".cache" / "kvshrink") / "codebooks"
    return root / f"fibquant-v{FORMAT}-d{d}-k{k}-n{n}-s{seed}-{dirs}-lloyd{int(lloyd)}.f32"


def _header(key: dict[str, object], data: bytes) -> dict[str, object]:
    return {"format": FORMAT, "key": key, "dtype": "<f4", "sha256": hashlib.sha256(data).hexdigest()}


def _load(path: Path, key: dict[str, object], shape: tuple[int, int]) -> np.ndarray | None:
    """The cached array, or None if the file is missing or fails any check (then it is rebuilt)."""
    try:
        with open(path, "rb") as f:
            head = json.loads(f.readline(4096).decode())
            data = f.read()
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    want = _header(key, data)
    if not isinstance(head, dict) or head != want or len(data) != 4 * shape[0] * shape[1]:
        return None
    return np.frombuffer(data, dtype="<f4").reshape(shape).copy()


def _save(path: Path, key: dict[str, object], arr: np.ndarray) -> None:
    """Write atomically; a cache that cannot be written (read-only home) is silently skipped."""
    data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(_header(key, data), sort_keys=True).encode() + b"\n")
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass


@functools.lru_cache(maxsize=64)
def _cached(d: int, k: int, n: int, seed: int, dirs: str, lloyd: bool, disk: bool) -> torch.Tensor:
    key: dict[str, object] = dict(d=d, k=k, n=n, seed=seed, dirs=dirs, lloyd=int(lloyd))
    path = cache_path(d, k, n, seed, dirs, lloyd)
    arr = _load(path, key, (n, k)) if disk else None
    if arr is None:
        arr = build_codebook(d, k, n, seed, dirs, lloyd)
        if disk:
            _save(path, key, arr)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def codebook(
    d: int, k: int, n: int, seed: int = 0, dirs: str = "fib", lloyd: bool = True, cache: bool = True
) -> torch.Tensor:
    """The FibQuant codebook ``[n, k]`` float32 (CPU), from memory, disk cache, or a fresh build.

    ``cache=False`` skips the disk cache (still memoized in memory). Treat the result as read-only.
    """
    return _cached(d, k, n, seed, dirs, bool(lloyd), cache)


def clear_cache() -> None:
    """Forget the codebooks held in memory (the disk cache stays)."""
    _cached.cache_clear()
