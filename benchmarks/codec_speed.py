"""How fast do the codecs encode and decode on the CPU, and how long does a FibQuant codebook take?

Throughput in vectors/s (one vector = one head's key or value of one token) for encode and full
decode of a ``[1, 8, T, d]`` Gaussian cache with a few outlier channels, d = 64 and 128, through
each codec's torch path (the reference; GPU kernels are benchmarked in decode_attention.py).
Codebooks and rotations are built before timing; each figure is the median of repeated runs
(at least ``--reps`` and at least ``--min-time`` seconds). Bits per element are measured from the
packed tensors (norms, scales and padding included); the relative error ‖x-x̂‖²/‖x‖² is on the
same data.

Codebook build time is cold: :func:`build_codebook` directly, no memory or disk cache, for a grid
up to d=256, k=8, N=65536; the MSE column is E‖u-û‖² of unit vectors on fresh samples.

Writes ``codec-speed.{json,md,png}`` into ``--out`` atomically.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/codec_speed.py --out docs/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy.spatial import cKDTree

from kvshrink.codecs import make_codec
from kvshrink.codecs.primitives.codebooks import build_codebook, source_samples

SPECS = [
    "int4",
    "kivi:b=2",
    "turboquant:b=2",
    "turboquant:b=3",
    "turboquant:b=4",
    "fibquant:b=1,k=2",
    "fibquant:b=2,k=2",
    "fibquant:b=3,k=2",
    "fibquant:b=1,k=4",
    "fibquant:b=2,k=4",
    "fibquant:b=3,k=4",
]
DIMS = (64, 128)
BUILDS = [  # (d, k, N)
    (64, 2, 16),
    (64, 4, 256),
    (64, 8, 256),
    (64, 6, 7),
    (128, 2, 64),
    (128, 4, 4096),
    (128, 8, 4096),
    (256, 2, 65536),
    (256, 4, 65536),
    (256, 6, 4096),
    (256, 8, 65536),
]


def _time(fn: Callable[[], object], reps: int, min_time: float) -> float:
    """Median seconds per call over at least ``reps`` calls and ``min_time`` seconds."""
    fn()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_time and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_codecs(tokens: int, reps: int, min_time: float) -> list[dict[str, object]]:
    rows = []
    for d in DIMS:
        g = torch.Generator().manual_seed(d)
        x = torch.randn(1, 8, tokens, d, generator=g)
        x[..., :2] *= 6.0
        n_vec = 8 * tokens
        for spec in SPECS:
            codec = make_codec(spec)
            packed = codec.encode(x, "key")  # builds codebook and rotation before timing
            err = float((codec.decode(packed, torch.float32) - x).pow(2).sum() / x.pow(2).sum())
            t_enc = _time(lambda c=codec, x=x: c.encode(x, "key"), reps, min_time)
            t_dec = _time(lambda c=codec, p=packed: c.decode(p), reps, min_time)
            row = {
                "spec": spec,
                "d": d,
                "vectors": n_vec,
                "encode_vps": n_vec / t_enc,
                "decode_vps": n_vec / t_dec,
                "bits_per_element": packed.bits_per_element(),
                "rel_error": err,
            }
            rows.append(row)
            print(
                f"d={d:<4} {spec:<18} enc {row['encode_vps']:>11.0f}/s  dec {row['decode_vps']:>11.0f}/s",
                flush=True,
            )
    return rows


def bench_builds(grid: list[tuple[int, int, int]]) -> list[dict[str, object]]:
    rows = []
    for d, k, n in grid:
        t0 = time.perf_counter()
        book = build_codebook(d, k, n)
        secs = time.perf_counter() - t0
        x = source_samples(d, k, 20_000, np.random.default_rng(12345))
        dist, _ = cKDTree(book.astype(np.float64)).query(x, workers=-1)
        mse = float((dist**2).mean()) * d / k
        rows.append({"d": d, "k": k, "n": n, "seconds": secs, "unit_mse": mse})
        print(f"build d={d:<4} k={k} N={n:<6} {secs:6.2f} s  MSE {mse:.4f}", flush=True)
    return rows


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _atomic(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".codec-speed.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _markdown(result: dict[str, object]) -> str:
    env = result["env"]
    lines = [
        "# Codec speed on CPU (torch reference paths)",
        "",
        f"{env['cpu']} ({env['cores']} cores, load average {env['load_avg_at_end']:.1f} at the end), "  # type: ignore[index]
        f"torch {env['torch']}, {env['threads']} torch thread(s) for codecs; "  # type: ignore[index]
        f"cache [1, 8, {result['tokens']}, d] Gaussian with outlier channels; median of repeated runs. "
        "Generated by `benchmarks/codec_speed.py`.",
        "",
        *([f"Run: {env['note']}", ""] if env.get("note") else []),  # type: ignore[attr-defined]
        "| method | d | bits/elem | rel. error | encode (vectors/s) | decode (vectors/s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["codecs"]:  # type: ignore[attr-defined]
        lines.append(
            f"| {r['spec']} | {r['d']} | {r['bits_per_element']:.3f} | {r['rel_error']:.4f} | "
            f"{r['encode_vps']:,.0f} | {r['decode_vps']:,.0f} |"
        )
    lines += [
        "",
        "## FibQuant codebook build (cold: no memory or disk cache)",
        "",
        f"scipy cKDTree search with {env['kdtree_workers']} workers; MSE = E‖u-û‖² of unit vectors.",  # type: ignore[index]
        "",
        "| d | k | N | rate log2(N)/k | build (s) | unit-vector MSE |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["builds"]:  # type: ignore[attr-defined]
        rate = np.log2(r["n"]) / r["k"]
        lines.append(
            f"| {r['d']} | {r['k']} | {r['n']} | {rate:.3g} | {r['seconds']:.2f} | {r['unit_mse']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, object], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [2, 2, 1.4]})
    codecs = result["codecs"]
    for ax, key, title in ((axes[0], "encode_vps", "encode"), (axes[1], "decode_vps", "decode")):
        ypos = np.arange(len(SPECS))
        for j, d in enumerate(DIMS):
            vals = [next(r[key] for r in codecs if r["spec"] == s and r["d"] == d) for s in SPECS]  # type: ignore[attr-defined]
            ax.barh(ypos + (j - 0.5) * 0.4, vals, height=0.4, label=f"d={d}")
        lows = [r[key] for r in codecs]  # type: ignore[attr-defined]
        ax.set_xlim(min(lows) / 3, max(lows) * 2)  # bars start well left of the smallest value
        ax.set_yticks(ypos, SPECS)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("vectors / s (log)")
        ax.set_title(f"{title} throughput, CPU")
        ax.legend(loc="lower right")
    builds = result["builds"]
    labels = [f"d={r['d']} k={r['k']} N={r['n']}" for r in builds]  # type: ignore[attr-defined]
    axes[2].barh(np.arange(len(builds)), [r["seconds"] for r in builds])  # type: ignore[attr-defined]
    axes[2].axvline(30, color="red", linestyle="--", label="30 s budget")
    axes[2].set_yticks(np.arange(len(builds)), labels)
    axes[2].invert_yaxis()
    axes[2].set_xlabel("seconds (cold)")
    axes[2].set_title("FibQuant codebook build")
    axes[2].legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per head (8 heads)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for encode/decode")
    ap.add_argument("--quick", action="store_true", help="small grid, for a smoke test")
    ap.add_argument("--note", default="", help="where and how it ran (recorded in the outputs)")
    ap.add_argument("--render", default="", help="re-render md/png from this JSON (no measuring)")
    args = ap.parse_args()
    stem = os.path.join(args.out, "codec-speed")
    os.makedirs(args.out, exist_ok=True)
    if args.render:
        with open(args.render) as f:
            result = json.load(f)
        if args.note:
            result["env"]["note"] = args.note
        _write(result, stem)
        return
    torch.set_num_threads(args.threads)
    grid = BUILDS[:3] if args.quick else BUILDS
    codecs = bench_codecs(
        256 if args.quick else args.tokens, 1 if args.quick else args.reps, 0 if args.quick else args.min_time
    )
    builds = bench_builds(grid)
    result = {
        "env": {
            "cpu": _cpu_name(),
            "cores": _cores(),
            "threads": args.threads,
            "kdtree_workers": _cores(),
            "torch": torch.__version__,
            "load_avg_at_end": os.getloadavg()[0],
            "python": platform.python_version(),
            "note": args.note,
        },
        "tokens": 256 if args.quick else args.tokens,
        "codecs": codecs,
        "builds": builds,
    }
    _write(result, stem)


def _write(result: dict[str, object], stem: str) -> None:
    _atomic(f"{stem}.json", json.dumps(result, indent=1).encode())
    _atomic(f"{stem}.md", _markdown(result).encode())
    _plot(result, f"{stem}.png")
    print(f"wrote {stem}.{{json,md,png}}")


if __name__ == "__main__":
    from kvshrink.cli.common import run_cli

    sys.exit(run_cli(main))
