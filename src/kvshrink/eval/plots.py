"""Frontier plots: compression ratio (log axis) vs attention cosine and vs perplexity delta."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from ..core.atomic import atomic_write_with

__all__ = ["plot_frontier", "save_png"]


def save_png(fig, path: str | Path) -> Path:
    """Write ``fig`` as a 110-dpi PNG atomically (never a half-written file) and close it."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def plot_frontier(data: dict, path: str | Path, family: Callable[[str], str], title: str = "") -> Path:
    """One line per method family; matplotlib is imported here only (``import kvshrink`` stays light)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = defaultdict(list)
    for r in data["rows"]:
        groups[family(r["method"])].append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name, rows in sorted(groups.items()):
        rows = sorted(rows, key=lambda r: r["compression_ratio"])
        x = [r["compression_ratio"] for r in rows]
        ax1.plot(x, [r["attn_cosine"] for r in rows], "o-", label=name)
        ax2.plot(x, [max(r["ppl_delta"], 1e-3) for r in rows], "o-", label=name)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("compression ratio vs fp16 (bytes held, log)")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_ylabel("attention-output cosine")
    ax2.set_ylabel("perplexity increase (log; floor 1e-3)")
    ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    fig.suptitle(title or f"{data['model']}: context {data['context']}, {data['windows']} windows")
    fig.tight_layout()

    return save_png(fig, path)
