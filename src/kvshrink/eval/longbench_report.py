"""``longbench`` tables and plots: accuracy per method, task and length, beside bytes held."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from .plots import save_png

__all__ = ["longbench_markdown", "method_means", "plot_longbench"]


def _acc(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def method_means(rows: list[dict], length: int | None = None) -> dict[str, dict[str, float]]:
    """Per method: mean accuracy over tasks (and lengths, unless ``length``), mean ratios."""
    acc: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if length is None or r["length"] == length:
            acc[r["method"]].append(r)
    return {
        m: {
            "accuracy": sum(r["accuracy"] for r in rs) / len(rs),
            "compression_ratio": sum(r["compression_ratio"] for r in rs) / len(rs),
            "resident_ratio": sum(r["resident_ratio"] for r in rs) / len(rs),
        }
        for m, rs in acc.items()
    }


def longbench_markdown(data: dict, title: str = "") -> str:
    rows = data["rows"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["task"], r["length"]): r for r in rows}
    out = [
        f"# {title or 'Long-context accuracy under KV-cache compression'}",
        "",
        f"model `{data['model']}`, {data['cases']} cases per task and length, greedy replies, exact scoring "
        "(every expected number or word must appear in the reply). Question-agnostic: the context is "
        "prefilled and compressed before the question is fed. Accuracy in percent; `ratio` is the fp16 "
        "DynamicCache bytes over the total bytes held after context + first question (host backups "
        "included), `resident` the same over the bytes on the attention device; dense tensors count "
        "2 bytes per element.",
    ]
    for length in data["lengths"]:
        out += [
            "",
            f"## {length} tokens",
            "",
            "| method | " + " | ".join(f"`{t}`" for t in tasks) + " | mean | ratio | resident |",
            "|---|" + "---:|" * (len(tasks) + 3),
        ]
        means = method_means(rows, length)
        for m in methods:
            if m not in means:
                continue
            cells = [_acc(by[(m, t, length)]["accuracy"]) if (m, t, length) in by else "–" for t in tasks]
            mm = means[m]
            out.append(
                f"| `{m}` | " + " | ".join(cells) + f" | {_acc(mm['accuracy'])} | "
                f"{mm['compression_ratio']:.2f}x | {mm['resident_ratio']:.2f}x |"
            )
    turns = [r for r in rows if "turn_accuracy" in r]
    if turns:
        out += ["", "## Multi-turn accuracy by turn", "", "| method | length | " + " | ".join(
            f"turn {i + 1}" for i in range(len(turns[0]["turn_accuracy"]))) + " |",
            "|---|---:|" + "---:|" * len(turns[0]["turn_accuracy"])]  # fmt: skip
        for r in turns:
            out.append(
                f"| `{r['method']}` | {r['length']} | "
                + " | ".join(_acc(a) for a in r["turn_accuracy"])
                + " |"
            )
    return "\n".join(out) + "\n"


def plot_longbench(data: dict, path: str | Path, title: str = "") -> Path:
    """Left: mean accuracy over tasks vs length, per method. Right: vs compression ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for m in methods:
        lengths = sorted({r["length"] for r in rows if r["method"] == m})
        acc = [method_means(rows, n)[m]["accuracy"] for n in lengths]
        style = "s--" if m.startswith("kvpress/") else ("k^-" if m == "none" else "o-")
        ax1.plot(lengths, acc, style, label=m)
        overall = method_means(rows)[m]
        ax2.plot(
            [overall["compression_ratio"]], [overall["accuracy"]], style[:-1] or "o", markersize=8, label=m
        )
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("context length (tokens)")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("compression ratio vs fp16 (total bytes held, log)")
    for ax in (ax1, ax2):
        ax.set_ylabel("accuracy, mean over tasks (%)")
        ax.set_ylim(-3, 103)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7, loc="best")
    fig.suptitle(
        title or f"{data['model']}: long-context accuracy, {data['cases']} cases per task and length"
    )
    fig.tight_layout()

    return save_png(fig, path)
