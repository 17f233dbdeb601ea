"""Screen heavy-token stages (``src/kvshrink/eval/heavy.py``) on a per-layer plan, issue 4.

Why: at ~5.5x the best plan ([P5] in ``frontier_smollm2.py``) still adds ~+0.22 perplexity, and
SmolLM2's attention is concentrated: besides token 0 (a sink, already exact) a few tokens per
head take a large share of the mass. This measures what holding them at a higher precision buys
on the frontier harness (same windows and continuation, KL and Δppl beside the bytes) on a few
windows and one seed, before a plan becomes a target row (16 windows x 3 seeds).

    PYTHONPATH=src python benchmarks/heavy_tokens_screen.py --windows 6 --heavy "heavy:m=8;heavy:m=32,b=4"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from frontier_smollm2 import TARGETS
from kvshrink.core.atomic import atomic_write
from kvshrink.data import load_text
from kvshrink.eval.frontier import FrontierConfig, run_frontier
from kvshrink.eval.methods import build_method
from kvshrink.models import load_model

P5 = TARGETS["best at >=5.5x, log-coded norms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--plan", default=P5, help="the per-layer plan (default: [P5])")
    ap.add_argument("--label", default="P5", help="short name of --plan in the rows")
    ap.add_argument(
        "--heavy",
        default="heavy:m=8,last=0.75",
        help="heavy stages, ';'-separated (src/kvshrink/eval/heavy.py), e.g. 'heavy:m=8;heavy:m=32,b=4'",
    )
    ap.add_argument("--no-base", action="store_true", help="leave out the plan alone")
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--stem", default="heavy-tokens-smollm2")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    ids = tok(load_text("paul-graham"), return_tensors="pt").input_ids[0]
    cfg = FrontierConfig(context=2048, continuation=256, windows=args.windows)
    methods = [] if args.no_base else [build_method(args.plan)]
    for item in args.heavy.split(";"):
        method = build_method(f"{item}+{args.plan}")
        method.spec = f"{item}+{args.label}"  # rows named by the short label, not the whole plan
        methods.append(method)
    t0 = time.time()
    res = run_frontier(model, ids, methods, cfg, "smollm2-135m").to_json()
    rows = [
        {
            "method": row["method"] if "heavy" in row["method"] else args.label,
            **{
                k: row[k]
                for k in ("compression_ratio", "ppl_delta", "ppl_delta_se", "kl", "kl_se", "attn_cosine")
            },
        }
        for row in res["rows"]
    ]
    out = {"windows": args.windows, "plan": args.plan, "baseline_ppl": res.get("baseline_ppl"), "rows": rows}
    out["wall_s"] = round(time.time() - t0)
    path = Path(args.out) / f"{args.stem}.json"
    atomic_write(str(path), json.dumps(out, indent=1))
    for r in rows:
        print(
            f"{r['method'][:40]:40s} {r['compression_ratio']:.3f}x  dppl {r['ppl_delta']:+.3f} ± {r['ppl_delta_se']:.3f}"
            f"  KL {r['kl']:.5f}  cos {r['attn_cosine']:.4f}"
        )


if __name__ == "__main__":
    main()
