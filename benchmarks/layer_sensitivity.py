"""Which layers' K and V error hurts SmolLM2-135M? (issue 4: where to spend the bits)

Per layer L and role (keys, values): only that role of layer L goes through a low-rate codec,
every other tensor stays exact, measured on the frontier harness's windows, queries and metrics
(one capture per window serves all rows; see :func:`measure`). The
KL of the next-token distributions from the uncompressed cache's is the ranking signal: it is
far less noisy than a perplexity delta when one tensor of sixty is perturbed. An ``exact``
row checks that the cache is restored between rows.

``--allocate`` turns a sensitivity JSON into per-layer specs (greedy, :func:`allocate`) without
running the model.

    PYTHONPATH=src python benchmarks/layer_sensitivity.py --out docs/results
    PYTHONPATH=src python benchmarks/layer_sensitivity.py --allocate --ratio 5.6 --ratio 7

The ``white=4`` plans of ``frontier_smollm2.py`` (keys re-measured alone, values from the plain run)::

    PYTHONPATH=src python benchmarks/layer_sensitivity.py --roles key --out /tmp/white \
        --codecs "fibquant:b=1.5,k=4,sinks=1,prerope=1,white=4;fibquant:b=2.5,k=4,sinks=1,prerope=1,white=4"
    PYTHONPATH=src python benchmarks/layer_sensitivity.py --allocate --ratio 5.6 --ratio 7.15 \
        --sens docs/results/layer-sensitivity-smollm2.json,docs/results/layer-sensitivity-smollm2-white.json \
        --template "fibquant:b=2,k=4,kb={kb},vb={vb},sinks=1,window=16,prerope=1,white=4"

The ``normbits=8`` plan (keys with white=4 and values plain re-measured at 3.5 bits, one run per
role, joined into ``layer-sensitivity-smollm2-35.json``; the 3.5-bit codebook's 256 KB is counted,
so it is allocated at 5.79x to land at 5.5x)::

    PYTHONPATH=src python benchmarks/layer_sensitivity.py --roles key --out /tmp/k35 \
        --codecs "fibquant:b=3.5,k=4,sinks=1,prerope=1,white=4"
    PYTHONPATH=src python benchmarks/layer_sensitivity.py --roles value --out /tmp/v35 \
        --codecs "fibquant:b=3.5,k=4,sinks=1,prerope=1"
    PYTHONPATH=src python benchmarks/layer_sensitivity.py --allocate --ratio 5.79 --rates 1,1.5,2,2.5,3,3.5 \
        --sens docs/results/layer-sensitivity-smollm2.json,docs/results/layer-sensitivity-smollm2-white.json,docs/results/layer-sensitivity-smollm2-35.json \
        --template "fibquant:b=2,k=4,kb={kb},vb={vb},sinks=1,window=16,prerope=1,white=4,normbits=8"
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from kvshrink.codecs import make_codec
from kvshrink.core.atomic import atomic_write
from kvshrink.core.errors import SpecError
from kvshrink.eval.capture import capture
from kvshrink.eval.frontier import FrontierConfig, _continue, _query_positions, window_starts
from kvshrink.eval.methods import code_keys, code_values
from kvshrink.eval.metrics import AttnFidelity, attention_fidelity, rel_mse, token_nll_kl
from kvshrink.eval.plots import save_png
from kvshrink.eval.report import write_json

STEM = "layer-sensitivity-smollm2"
ALLOC = "layer-allocation-smollm2"
ROLES = ("key", "value")


@torch.no_grad()
def measure(
    model,
    ids,
    layers: tuple[int, ...],
    codecs: list[str],
    cfg: FrontierConfig,
    progress=None,
    roles: tuple[str, ...] = ROLES,
) -> dict:
    """One capture per window; each row swaps one coded tensor into the cache, continues, restores.

    The frontier harness would re-code all sixty tensors (fp16 for the untouched ones) and score
    attention on every layer for each row; here the untouched tensors stay exact and only the
    coded layer is scored, with the harness's own windows, query positions, continuation and
    metrics, so the numbers compare with its rows. An ``exact`` row per window (the restored
    cache, nothing coded) checks the restore: its KL must be 0.
    """
    built = {c: make_codec(c) for c in codecs}
    starts = window_starts(ids.numel(), cfg)
    keys = [(c, role, li) for c in codecs for role in roles for li in layers]
    acc: dict = {k: {"nll": [], "kl": [], "attn": AttnFidelity(), "err": 0.0, "norm": 0.0} for k in keys}
    base_nll, exact_kl = [], []
    bar = progress(len(starts) * (len(keys) + 2)) if progress else None
    for cap, held, cont, targets, ref in captured_windows(model, ids, cfg):
        base_nll.append(float(token_nll_kl(ref, ref, targets)[0].mean()))
        exact_kl.append(
            float(token_nll_kl(_swap_continue(model, cap.cache, held, cont), ref, targets)[1].mean())
        )
        if bar:
            bar.update(2)
        for c, role, li in keys:
            layer, a = cap.layers[li], acc[(c, role, li)]
            if role == "key":
                k_hat, v_hat = code_keys(built[c], layer)[0], layer.v
                e, n = rel_mse(layer.k, k_hat)
            else:
                k_hat, v_hat = layer.k, code_values(built[c], layer)[0]
                e, n = rel_mse(layer.v, v_hat)
            nll, kl = token_nll_kl(
                _swap_continue(model, cap.cache, held, cont, li, k_hat, v_hat), ref, targets
            )
            a["nll"].append(float(nll.mean()))
            a["kl"].append(float(kl.mean()))
            a["err"], a["norm"] = a["err"] + e, a["norm"] + n
            a["attn"].add(
                attention_fidelity(
                    layer.q, layer.q_pos, layer.k, layer.v, k_hat, v_hat, layer.scaling, layer.sliding_window
                )
            )
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    base = math.exp(statistics.fmean(base_nll))
    table = []
    for (c, role, li), a in acc.items():
        deltas = [math.exp(x) - math.exp(y) for x, y in zip(a["nll"], base_nll)]
        table.append(
            {
                "codec": c,
                "role": role,
                "layer": li,
                "kl": statistics.fmean(a["kl"]),
                "kl_se": _se(a["kl"]),
                "ppl_delta": math.exp(statistics.fmean(a["nll"])) - base,
                "ppl_delta_se": _se(deltas),
                "attn_cosine": a["attn"].attn_cosine,  # of the coded layer only
                "rel_mse": a["err"] / max(a["norm"], 1e-30),
            }
        )
    return {
        "model": "smollm2-135m",
        "context": cfg.context,
        "windows": cfg.windows,
        "continuation": cfg.continuation,
        "baseline_ppl": base,
        "floor": {"kl": statistics.fmean(exact_kl)},
        "codecs": codecs,
        "n_layers": model.config.num_hidden_layers,
        "layers": list(layers),
        "rows": table,
    }


def captured_windows(model, ids: torch.Tensor, cfg: FrontierConfig):
    """Per window of the frontier harness: its capture (the harness's query positions), the cache's
    captured tensors to restore from, the continuation, its targets and the exact logits."""
    q_pos = _query_positions(cfg.context, cfg.n_queries)
    for start in window_starts(ids.numel(), cfg):
        win = ids[start : start + cfg.context + cfg.continuation + 1].unsqueeze(0)
        prefix, cont = win[:, : cfg.context], win[:, cfg.context : cfg.context + cfg.continuation]
        cap = capture(model, prefix, q_pos, keep_logits="last")
        held = [(h.keys, h.values) for h in cap.cache.layers]
        yield cap, held, cont, win[0, cfg.context + 1 :], _swap_continue(model, cap.cache, held, cont)


def _swap_continue(model, cache, held, cont, li=None, k=None, v=None) -> torch.Tensor:
    """Restore every layer to the captured tensors (a continuation appends to all), put layer
    ``li``'s decoded ``k``/``v`` in, and continue: the continuation's logits."""
    for h, (k0, v0) in zip(cache.layers, held):
        h.keys, h.values = k0, v0
    if li is not None:
        h = cache.layers[li]
        h.keys, h.values = k.to(h.keys.dtype).contiguous(), v.to(h.values.dtype).contiguous()
    return _continue(model, cache, cont)


def _se(xs: list[float]) -> float:
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")


def markdown(data: dict, top: int = 8) -> str:
    out = [
        "# Per-layer KV sensitivity, SmolLM2-135M",
        "",
        f"Only one role of one layer is coded, the rest exact; context {data['context']}, {data['windows']} windows "
        f"of {data['continuation']} teacher-forced tokens; baseline perplexity {data['baseline_ppl']:.3f}; "
        f"restored-cache check: KL {data['floor']['kl']:.1e} (must be 0). Attention cosine is of the coded layer. "
        "Regenerate: `PYTHONPATH=src python benchmarks/layer_sensitivity.py`.",
        "",
    ]
    for c in data["codecs"]:
        out += [
            f"## `{c}`",
            "",
            "| layer | K: KL | K: Δppl ± se | V: KL | V: Δppl ± se |",
            "|---:|---:|---:|---:|---:|",
        ]
        by = {(r["role"], r["layer"]): r for r in data["rows"] if r["codec"] == c}

        def cells(r: dict | None) -> str:
            return (
                "– | –" if r is None else f"{r['kl']:.5f} | {r['ppl_delta']:+.3f} ± {r['ppl_delta_se']:.3f}"
            )

        for li in data["layers"]:
            out.append(f"| {li} | {cells(by.get(('key', li)))} | {cells(by.get(('value', li)))} |")
        ranked = sorted(by.values(), key=lambda r: -r["kl"])
        total = sum(r["kl"] for r in ranked)
        head = ", ".join(f"{r['role'][0].upper()}{r['layer']} {r['kl']:.4f}" for r in ranked[:top])
        tail = ", ".join(f"{r['role'][0].upper()}{r['layer']} {r['kl']:.5f}" for r in ranked[-top:])
        share = sum(r["kl"] for r in ranked[:top]) / max(total, 1e-30)
        out += [
            "",
            f"Most sensitive: {head} ({share:.0%} of the summed KL in {top} of {len(ranked)} tensors).",
            f"Least sensitive: {tail}.",
            "",
        ]
    return "\n".join(out)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    layers = data["layers"]
    for c in data["codecs"]:
        for role, mark in zip(ROLES, ("o-", "s--")):
            by = {r["layer"]: r["kl"] for r in data["rows"] if r["codec"] == c and r["role"] == role}
            if not by:  # a --roles run
                continue
            ax.plot(layers, [max(by[i], 1e-6) for i in layers], mark, label=f"{role}s: {c}")
    ax.set_yscale("log")
    ax.set_xlabel("layer (only this layer's keys or values coded)")
    ax.set_ylabel("KL from the uncompressed cache")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"SmolLM2-135M per-layer sensitivity, context {data['context']}, {data['windows']} windows")
    fig.tight_layout()
    save_png(fig, path)


# -- allocation ------------------------------------------------------------------------------


def read_json(path: Path, what: str) -> dict:
    """A JSON input of ``--allocate``, or a one-line error naming the flag and the missing file."""
    if not path.is_file():
        raise SystemExit(f"{what}: no file {path}")
    return json.loads(path.read_text())


def sensitivity(data: dict) -> dict[tuple[str, int], tuple[tuple[float, ...], tuple[float, ...]]]:
    """Per (role, layer): a KL-vs-rate curve, ``(rates, log2 KL)`` at every measured rate.

    Why this shape: high-rate quantization error falls as 2^(-2b), and KL is quadratic in small
    logit errors, so KL(b) ≈ s·2^(-slope·b) with slope near 2. Between measured rates the curve
    is log-linear with each segment's decay clamped to [1, 3] bits of log2 KL per bit (against
    noise: a tensor the model ignores can measure higher KL at a higher rate); outside them it
    goes on with the end segment's decay; one measured rate assumes 2.
    """
    out = {}
    for role in ROLES:
        for li in range(data["n_layers"]):
            kl = {_rate(r["codec"]): r["kl"] for r in data["rows"] if r["role"] == role and r["layer"] == li}
            out[(role, li)] = kl_curve(kl)
    return out


def kl_curve(kl: dict[float, float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``{rate: KL}`` -> ``(rates, log2 KL)`` with each segment's decay clamped (:func:`sensitivity`)."""
    rates = sorted(kl)
    logs = [math.log2(max(kl[rates[0]], 1e-7))]
    for a, b in itertools.pairwise(rates):
        slope = (math.log2(max(kl[a], 1e-7)) - math.log2(max(kl[b], 1e-7))) / (b - a)
        logs.append(logs[-1] - min(max(slope, 1.0), 3.0) * (b - a))
    return tuple(rates), tuple(logs)


def head_sensitivity(sens: dict, head_files: list[dict], own_curve: int = 3) -> dict:
    """Per (role, layer, KV head) KL-vs-rate curves, from head files (``benchmarks/head_sensitivity.py``:
    at one rate, the KL with only that head of that role coded).

    With head rows at ``own_curve`` or more rates for a role, each head gets its own curve
    (:func:`kl_curve`, as a layer does). With fewer, the layer's curve is split by each head's share
    of the layer's summed head KL (the sum is within ~10% of the whole layer coded at once): heads
    of one layer differ by up to 25x in KL but decay much alike. With two rates the share at each
    rate of the layer curve is interpolated in log space between them and held flat beyond.
    """
    rows: dict[tuple[str, int, int], dict[float, float]] = {}  # (role, layer, head) -> {rate: KL}
    for data in head_files:
        for r in data["rows"]:
            rows.setdefault((data["role"], r["layer"], r["head"]), {})[_rate(data["codec"])] = r["kl"]
    out = {}
    for (role, li), curve in sens.items():
        heads = sorted(h for r, layer, h in rows if r == role and layer == li)
        if not heads:
            raise SpecError(
                f"--heads: no head rows for layer {li} {role}s; measure every layer and both roles"
            )
        measured = sorted(rows[(role, li, heads[0])])
        if len(measured) >= own_curve:
            for h in heads:
                out[(role, li, h)] = kl_curve(rows[(role, li, h)])
            continue
        points = []  # (rate, each head's share of the layer's summed head KL at that rate)
        for b in measured:
            kls = [max(rows[(role, li, h)][b], 1e-9) for h in heads]
            points.append((b, [x / sum(kls) for x in kls]))
        rates, logs = curve
        for i, h in enumerate(heads):
            shifted = []
            for b, lg in zip(rates, logs):
                if len(points) == 1 or b <= points[0][0]:
                    share = points[0][1][i]
                elif b >= points[-1][0]:
                    share = points[-1][1][i]
                else:
                    (b0, s0), (b1, s1) = next(
                        (p, q) for p, q in itertools.pairwise(points) if p[0] <= b <= q[0]
                    )
                    t = (b - b0) / (b1 - b0)
                    share = 2.0 ** ((1 - t) * math.log2(s0[i]) + t * math.log2(s1[i]))
                shifted.append(lg + math.log2(share))
            out[(role, li, h)] = (rates, tuple(shifted))
    return out


def curve_kl(curve: tuple[tuple[float, ...], tuple[float, ...]], b: float) -> float:
    """KL at rate ``b`` on a :func:`sensitivity` curve (log-linear, extended at the ends)."""
    rates, logs = curve
    if len(rates) == 1:
        return 2.0 ** (logs[0] - 2.0 * (b - rates[0]))
    i = min(max(sum(r <= b for r in rates) - 1, 0), len(rates) - 2)  # segment [i, i+1]
    slope = (logs[i] - logs[i + 1]) / (rates[i + 1] - rates[i])
    return 2.0 ** (logs[i] - slope * (b - rates[i]))


def _rate(codec: str, d: int = 64) -> float:
    """Bits per coordinate the allocator charges for ``codec``'s keys: ``b``, plus the
    coefficients of ``pca=r`` directions (``r·pcabits/d``; SmolLM2's d = 64), which a key tier
    pays for with a lower ``kb`` (``frontier_smollm2.keys_apart``)."""
    from kvshrink.core.spec import parse_stage

    opts = dict(parse_stage(codec).options)
    return float(opts["b"]) + int(opts.get("pca", 0)) * int(opts.get("pcabits", 8)) / d


def allocate(sens: dict, avg_bits: float, rates: tuple[float, ...]) -> dict[tuple[str, int], float]:
    """Greedy marginal-gain allocation of per-tensor rates averaging ``avg_bits`` (K and V weigh the same).

    Start every tensor at the lowest rate, then repeatedly raise the one whose predicted KL
    drops most per extra bit, until the budget is spent: the discrete water-filling of
    KL(b) = s·2^(-slope·b) summed over tensors (additive for small, independent perturbations).
    """
    alloc = {t: rates[0] for t in sens}
    budget = avg_bits * len(sens) - rates[0] * len(sens)

    def kl(t, b):
        return curve_kl(sens[t], b)

    while True:
        best, gain = None, 0.0
        for t, b in alloc.items():
            up = [r for r in rates if r > b]
            if not up or up[0] - b > budget + 1e-9:
                continue
            g = (kl(t, b) - kl(t, up[0])) / (up[0] - b)
            if g > gain:
                best, gain = t, g
        if best is None:
            return alloc
        nxt = min(r for r in rates if r > alloc[best])
        budget -= nxt - alloc[best]
        alloc[best] = nxt


def alloc_spec(alloc: dict, n_layers: int, template: str) -> str:
    """Per-layer spec of an allocation: layers sharing a (key, value) rate pair share one codec,
    the most common pair is the base codec."""
    from kvshrink.eval.layerwise import format_layers, parse_layer_plan

    groups: dict[tuple[float, float], list[int]] = {}
    for li in range(n_layers):
        groups.setdefault((alloc[("key", li)], alloc[("value", li)]), []).append(li)
    base = max(groups, key=lambda p: (len(groups[p]), p))
    parts = [
        f"layers:at=[{format_layers(layers)}],codec=[{template.format(kb=kb, vb=vb)}]"
        for (kb, vb), layers in groups.items()
        if (kb, vb) != base
    ]
    return str(parse_layer_plan("+".join([*parts, template.format(kb=base[0], vb=base[1])])))


def alloc_spec_heads(alloc: dict, n_layers: int, template: str) -> str:
    """Per-head allocation as a plan: each layer's most common (key, value) rate pair as its layer
    tier, the heads that differ as ``heads=`` tiers (canonicalized by the plan parser)."""
    from collections import Counter

    from kvshrink.eval.layerwise import parse_layer_plan

    n_heads = 1 + max(h for _, _, h in alloc)
    layer_alloc, parts = {}, []
    for li in range(n_layers):
        for role in ROLES:
            rates = Counter(alloc[(role, li, h)] for h in range(n_heads))
            layer_alloc[(role, li)] = max(rates, key=lambda r: (rates[r], r))
        kb, vb = layer_alloc[("key", li)], layer_alloc[("value", li)]
        for h in range(n_heads):
            hk, hv = alloc[("key", li, h)], alloc[("value", li, h)]
            if hk != kb:
                parts.append(f"layers:at=[{li}],heads=[{h}],key=[{template.format(kb=hk, vb=vb)}]")
            if hv != vb:
                parts.append(f"layers:at=[{li}],heads=[{h}],value=[{template.format(kb=kb, vb=hv)}]")
    base = alloc_spec(layer_alloc, n_layers, template)
    return str(parse_layer_plan("+".join([*parts, base])))


def code_bits(ratio: float, template: str, d: int, context: int) -> float:
    """Average code bits per coordinate that give ``ratio`` vs fp16 with the template's fp16 tokens.

    A coded vector holds codes plus its norm (``normbits``/d bits per coordinate: 16 for fp16, 8
    for the log code); ``sinks + window`` tokens of each ``context`` stay fp16. Shared codebooks
    (~1%) are left to the measurement.
    """
    from kvshrink.core.spec import parse_stage

    opts = dict(parse_stage(template.format(kb=2, vb=2)).options)
    f = (int(opts.get("sinks", 0)) + int(opts.get("window", 0))) / context
    return (16 / ratio - 16 * f) / (1 - f) - int(opts.get("normbits", 16)) / d


def alloc_markdown(data: dict) -> str:
    """The allocation table, widest compression first; ``uniform`` rows are the one-rate references."""
    from kvshrink.eval.layerwise import is_layerwise

    lines = [
        "# Per-layer rate allocations vs one rate for every layer, SmolLM2-135M",
        "",
        f"Frontier harness, context {data['context']}, {data['windows']} windows x 1 rotation seed, {data['continuation']} "
        f"teacher-forced tokens; baseline perplexity {data['baseline_ppl']:.3f}. Δppl ± standard error over windows. "
        f'Specs from `benchmarks/layer_sensitivity.py --allocate`; regenerate with `--measure "spec;..."`.',
        "",
        "| kind | spec | ratio | Δppl ± se | KL | attn cos |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in sorted(data["rows"], key=lambda r: -r["compression_ratio"]):
        kind = "per-layer" if is_layerwise(r["method"]) else "uniform"
        lines.append(
            f"| {kind} | `{r['method']}` | {r['compression_ratio']:.2f}x | {r['ppl_delta']:+.3f} ± {r['ppl_delta_se']:.3f} | "
            f"{r['kl']:.4f} | {r['attn_cosine']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def measure_specs(args, out: Path) -> int:
    """Allocations beside the uniform rows they compete with, on the same windows (one capture each)."""
    from kvshrink.data import load_text
    from kvshrink.eval.frontier import run_frontier
    from kvshrink.eval.methods import build_method
    from kvshrink.models import load_model

    specs = [x.strip() for x in args.measure.split(";") if x.strip()]
    for spec in specs:  # fail before the model loads
        build_method(spec)
    t0 = time.time()
    model, tok = load_model("smollm2-135m")
    model.to(args.device)
    ids = torch.tensor(tok(load_text(), add_special_tokens=False).input_ids, dtype=torch.long)
    cfg = FrontierConfig(context=args.context, windows=args.windows, continuation=args.continuation)
    data = run_frontier(model, ids, specs, cfg, "smollm2-135m", progress=_bar).to_json()
    data["seconds"] = time.time() - t0
    prev = out / f"{ALLOC}.json"
    if args.append and prev.exists():  # rows measured earlier on the very same windows
        old = json.loads(prev.read_text())
        same = all(old[k] == data[k] for k in ("context", "windows", "continuation"))
        if not same or abs(old["baseline_ppl"] - data["baseline_ppl"]) > 1e-9:
            raise SpecError(f"--append: {prev} was measured on other windows; drop --append or match them")
        done = {r["method"] for r in data["rows"]}
        data["rows"] = [r for r in old["rows"] if r["method"] not in done] + data["rows"]
        data["seconds"] += old.get("seconds", 0.0)
    write_json(out / f"{ALLOC}.json", data)
    md = alloc_markdown(data)
    atomic_write(out / f"{ALLOC}.md", md)
    print(md)
    return 0


def _bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sensitivity", file=sys.stderr, dynamic_ncols=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument(
        "--continuation",
        type=int,
        default=128,
        help="teacher-forced tokens per window (CPU: 128 keeps it ~20 min)",
    )
    ap.add_argument(
        "--codecs",
        default="fibquant:b=1.5,k=4,sinks=1,prerope=1",
        help="low-rate codecs, 'spec;spec' (fibquant with b=, for --allocate's rate fit)",
    )
    ap.add_argument("--layers", default="", help="only these layers, e.g. 0-3,29 (default: all)")
    ap.add_argument(
        "--roles",
        default="key,value",
        help="code only these roles (e.g. key: a key-only option such as white= leaves values as they were)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (on a busy 2-core host 2 threads ran 10x slower than 1)",
    )
    ap.add_argument("--allocate", action="store_true", help="print per-layer specs from the JSON in --out")
    ap.add_argument("--ratio", type=float, action="append", help="--allocate: target compression ratios")
    ap.add_argument(
        "--template",
        default="fibquant:b=2,k=4,kb={kb},vb={vb},sinks=1,prerope=1",
        help="--allocate: codec of a layer with key rate {kb} and value rate {vb}",
    )
    ap.add_argument("--rates", default="1,1.5,2,2.5,3", help="--allocate: rates a tensor may get")
    ap.add_argument(
        "--sens",
        default="",
        help="--allocate: sensitivity JSONs a,b (default: the one in --out); a later file's rows replace an "
        "earlier one's, e.g. keys re-measured with white=4 over the plain run's values",
    )
    ap.add_argument(
        "--heads",
        default="",
        help="--allocate per KV head: head sensitivity JSONs a,b (benchmarks/head_sensitivity.py; one or "
        "two rates per role), splitting each layer curve of --sens by the heads' shares",
    )
    ap.add_argument(
        "--measure",
        default="",
        help="'spec;spec': run these (per-layer) specs through run_frontier on --windows windows of "
        f"--continuation tokens and write {ALLOC}.{{json,md}}",
    )
    ap.add_argument("--append", action="store_true", help="--measure: keep the rows already in the JSON")
    args = ap.parse_args()
    out = Path(args.out)
    torch.set_num_threads(args.threads)
    if args.allocate:
        paths = [Path(p) for p in args.sens.split(",") if p.strip()] or [out / f"{STEM}.json"]
        data = read_json(paths[0], "--sens")
        for extra in paths[1:]:  # a later file's rows override an earlier one's (same role, layer, rate)
            more = read_json(extra, "--sens")
            data["rows"] = data["rows"] + more["rows"]
            data["codecs"] = list(dict.fromkeys(data["codecs"] + more["codecs"]))
        if data["layers"] != list(range(data["n_layers"])):
            raise SpecError(f"{paths[0]} covers layers {data['layers']}; --allocate needs every layer")
        sens = sensitivity(data)
        if args.heads:
            sens = head_sensitivity(sens, [read_json(Path(p), "--heads") for p in args.heads.split(",")])
        rates = tuple(sorted(float(r) for r in args.rates.split(",")))
        for ratio in args.ratio or [5.6, 7.0]:
            avg = code_bits(ratio, args.template, 64, data["context"])
            alloc = allocate(sens, avg, rates)
            if args.heads:
                spec = alloc_spec_heads(alloc, data["n_layers"], args.template)
            else:
                spec = alloc_spec(alloc, data["n_layers"], args.template)
            pred = sum(curve_kl(c, alloc[t]) for t, c in sens.items())
            print(f"# ~{ratio}x: {avg:.3f} bits/coordinate, predicted summed KL {pred:.4f}\n{spec}")
        return 0
    from kvshrink.data import load_text
    from kvshrink.eval.layerwise import parse_layers
    from kvshrink.models import load_model

    if args.measure:
        return measure_specs(args, out)

    codecs = [c.strip() for c in args.codecs.split(";") if c.strip()]
    roles = tuple(r.strip() for r in args.roles.split(",") if r.strip())
    if not roles or set(roles) - set(ROLES):
        raise SpecError(f"--roles: give key, value or key,value (got {args.roles!r})")
    for c in codecs:  # fail before the model loads
        make_codec(c)
        _rate(c)
    t0 = time.time()
    model, tok = load_model("smollm2-135m")
    model.to(args.device)
    n_layers = model.config.num_hidden_layers
    ids = torch.tensor(tok(load_text(), add_special_tokens=False).input_ids, dtype=torch.long)
    cfg = FrontierConfig(context=args.context, windows=args.windows, continuation=args.continuation)
    layers = parse_layers(args.layers) if args.layers else tuple(range(n_layers))
    if layers[-1] >= n_layers:
        raise SpecError(f"--layers: layer {layers[-1]} is out of range (valid: 0-{n_layers - 1})")
    data = measure(model, ids, layers, codecs, cfg, progress=_bar, roles=roles)
    data["seconds"] = time.time() - t0
    write_json(out / f"{STEM}.json", data)
    atomic_write(out / f"{STEM}.md", markdown(data))
    plot(data, out / f"{STEM}.png")
    print(markdown(data))
    return 0


if __name__ == "__main__":
    from kvshrink.cli.common import run_cli

    sys.exit(run_cli(main))
