"""Frontier tables: Markdown and JSON, written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..core.atomic import atomic_write

__all__ = ["frontier_markdown", "write_json"]


def _f(x: float, nd: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{nd}f}"


def frontier_markdown(data: dict, title: str = "") -> str:
    rows = sorted(data["rows"], key=lambda r: r["compression_ratio"])
    out = [
        f"# {title or 'KV-cache frontier'}",
        "",
        f"model `{data['model']}`, context {data['context']}, {data['windows']} windows of "
        f"{data.get('continuation', 256)} teacher-forced tokens; baseline perplexity {data['baseline_ppl']:.4f}.",
        "Bytes are counted from the tensors held (codes, scales, norms, fp16 windows, codebooks).",
        "",
        "| method | bits/elem | ratio | attn cos | key ip err | ppl | Δppl (± se) | KL (± se) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| `{r['method']}` | {r['bits_per_element']:.3f} | {r['compression_ratio']:.2f}x | "
            f"{_f(r['attn_cosine'])} | {_f(r['key_ip_rel_err'])} | {r['ppl']:.3f} | "
            f"{r['ppl_delta']:+.3f} ± {_f(r.get('ppl_delta_se'), 3)} | {r['kl']:.4f} ± {_f(r.get('kl_se'))} |"
        )
    return "\n".join(out) + "\n"


def write_json(path: str | Path, data: dict) -> Path:
    return atomic_write(path, json.dumps(data, indent=2, allow_nan=True) + "\n")
