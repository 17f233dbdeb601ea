"""Which KV heads' K or V error hurts SmolLM2-135M? (issue 4: per-head rates)

``layer_sensitivity.py`` ranks layers; heads of one layer differ as much (one layer's key heads
span 20x in KL). Per layer and role, the layer's tensor goes through the codec once, then each
row swaps only one KV head's decoded slice into the exact cache and continues, on the frontier
harness's windows, queries and metrics (a head's codes are the same coded alone or with its
layer: every per-head quantity, ``white=`` included, is fitted per head).

The JSON (``head-sensitivity-smollm2-<role>-<rate>.json``) feeds
``layer_sensitivity.py --allocate --heads``: with files at three or more rates of a role each head
gets its own KL-vs-rate curve, with fewer each layer's curve is split by its heads' shares. The
first plan measured for issue 4 (two rates per role, run as two processes)::

    PYTHONPATH=src python benchmarks/head_sensitivity.py --role key --codec "fibquant:b=2,k=4,sinks=1,prerope=1,white=4"
    PYTHONPATH=src python benchmarks/head_sensitivity.py --role key --codec "fibquant:b=3,k=4,sinks=1,prerope=1,white=4"
    PYTHONPATH=src python benchmarks/head_sensitivity.py --role value --codec "fibquant:b=1.5,k=4,sinks=1,prerope=1"
    PYTHONPATH=src python benchmarks/head_sensitivity.py --role value --codec "fibquant:b=2.5,k=4,sinks=1,prerope=1"
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from kvshrink.codecs import make_codec
from kvshrink.core.errors import SpecError
from kvshrink.eval.frontier import FrontierConfig
from kvshrink.eval.methods import code_keys, code_values
from kvshrink.eval.metrics import token_nll_kl
from kvshrink.eval.report import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_sensitivity import _rate, _swap_continue, captured_windows

STEM = "head-sensitivity-smollm2"


@torch.no_grad()
def measure(model, ids: torch.Tensor, codec_spec: str, role: str, cfg: FrontierConfig) -> dict:
    codec = make_codec(codec_spec)
    n_layers = model.config.num_hidden_layers
    acc: dict[tuple[int, int], list[float]] = {}
    for w, (cap, held, cont, targets, ref) in enumerate(captured_windows(model, ids, cfg)):
        for li in range(n_layers):
            layer = cap.layers[li]
            exact = layer.k if role == "key" else layer.v
            hat = (code_keys if role == "key" else code_values)(codec, layer)[0].to(exact.dtype)
            for h in range(exact.shape[1]):
                mixed = exact.clone()
                mixed[:, h] = hat[:, h]
                k, v = (mixed, layer.v) if role == "key" else (layer.k, mixed)
                logits = _swap_continue(model, cap.cache, held, cont, li, k, v)
                acc.setdefault((li, h), []).append(float(token_nll_kl(logits, ref, targets)[1].mean()))
        print(f"window {w + 1}/{cfg.windows} done", file=sys.stderr, flush=True)
    rows = [
        {"layer": li, "head": h, "kl": statistics.fmean(v), "kl_windows": v}
        for (li, h), v in sorted(acc.items())
    ]
    return {
        "model": "smollm2-135m",
        "codec": codec_spec,
        "role": role,
        "context": cfg.context,
        "windows": cfg.windows,
        "continuation": cfg.continuation,
        "rows": rows,
    }


def markdown(data: dict) -> str:
    """Per layer: each head's KL and its share of the layer's summed head KL."""
    lines = [
        f"# Per-head sensitivity, SmolLM2-135M: {data['role']}s through `{data['codec']}`",
        "",
        f"One KV head coded at a time, the rest exact; context {data['context']}, {data['windows']} windows, "
        f"{data['continuation']} teacher-forced tokens; KL of the next-token distributions.",
        "",
        "| layer | KL per head | shares | max/min |",
        "|---:|---|---|---:|",
    ]
    per: dict[int, list[float]] = {}
    for r in data["rows"]:
        per.setdefault(r["layer"], []).append(r["kl"])
    for li, kls in sorted(per.items()):
        total = sum(kls)
        lines.append(
            f"| {li} | {' '.join(f'{x:.5f}' for x in kls)} | {' '.join(f'{x / total:.2f}' for x in kls)} | "
            f"{max(kls) / max(min(kls), 1e-9):.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codec", required=True, help="one codec spec with b= (the rate of the shares)")
    ap.add_argument("--role", required=True, help="key or value")
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--continuation", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.role not in ("key", "value"):
        raise SpecError(f"--role: give key or value (got {args.role!r})")
    codec = make_codec(args.codec)  # fail before the model loads
    rate = _rate(args.codec)
    torch.set_num_threads(args.threads)
    from kvshrink.data import load_text
    from kvshrink.models import load_model

    t0 = time.time()
    model, tok = load_model("smollm2-135m")
    ids = torch.tensor(tok(load_text(), add_special_tokens=False).input_ids, dtype=torch.long)
    cfg = FrontierConfig(context=args.context, windows=args.windows, continuation=args.continuation)
    data = measure(model, ids, args.codec, args.role, cfg)
    data["seconds"] = time.time() - t0
    # "value-1.5": not Path.with_suffix, which eats ".5"; keys with directions apart (pca=) are
    # named by the bits they cost, "key-pca-2" for b=1.75 + 16 bits of coefficients
    tag = "-pca" if getattr(codec.config, "pca", 0) else ""
    stem = f"{STEM}-{args.role}{tag}-{rate:g}"
    write_json(Path(args.out) / f"{stem}.json", data)
    from kvshrink.core.atomic import atomic_write

    atomic_write(Path(args.out) / f"{stem}.md", markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    from kvshrink.cli.common import run_cli

    sys.exit(run_cli(main))
