"""How much attention does each key coding lose? A quick screen of key-only codecs on SmolLM2-135M.

Why: a target row (16 windows x 3 seeds of the full model) takes ~15 minutes a plan on one core;
comparing ways to code *keys* at equal bytes needs only the attention of held-out queries. Per
window the model runs once over ``context + continuation`` tokens; every layer's prompt keys go
through each codec (pre-RoPE when the spec says so; ``white=`` fitted to the prompt's queries, as in
the frontier), and the continuation's queries (never seen by any fit) attend over the coded prompt
keys plus their own exact keys. Reported: the attention KL (exact || coded) averaged over query
positions and heads, summed over layers, averaged over windows; values stay exact.

    PYTHONPATH=src python benchmarks/key_coding_screen.py --starts 30000,90000 \\
        --specs "fibquant:b=3,k=4,sinks=1,prerope=1,white=4,normbits=8;fibquant:b=2.75,k=4,sinks=1,prerope=1,pca=4,pcabits=4,normbits=8"

Writes ``docs/results/key-coding-screen-smollm2.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from kvshrink.codecs import make_codec
from kvshrink.core.atomic import atomic_write
from kvshrink.core.errors import SpecError
from kvshrink.eval.capture import capture
from kvshrink.eval.frontier import _query_positions
from kvshrink.eval.methods import code_keys
from kvshrink.eval.metrics import _visible
from kvshrink.eval.report import write_json

STEM = "key-coding-screen-smollm2"


def layer_kls(cap_layer, ctx: int, n_prompt: int, specs: list[str]) -> dict[str, tuple[float, float]]:
    """``{spec: (attention KL of the continuation's queries, key bits per coordinate)}`` for one layer."""
    lay = cap_layer
    prompt = dataclasses.replace(
        lay,
        q=lay.q[:, :, :n_prompt],
        q_pos=lay.q_pos[:n_prompt],
        k=lay.k[:, :, :ctx],
        v=lay.v[:, :, :ctx],
        k_pre=None if lay.k_pre is None else lay.k_pre[:, :, :ctx],
        cos=None if lay.cos is None else lay.cos[:, :ctx],
        sin=None if lay.sin is None else lay.sin[:, :ctx],
    )
    qc = lay.q[:, :, n_prompt:].float()
    g = qc.shape[1] // lay.k.shape[1]
    hidden = ~_visible(lay.q_pos[n_prompt:], lay.k.shape[2], lay.sliding_window)  # the harness's mask

    def logp(k: torch.Tensor) -> torch.Tensor:
        s = (qc @ k.repeat_interleave(g, 1).transpose(-1, -2)) * lay.scaling
        return torch.log_softmax(s.masked_fill(hidden, float("-inf")), -1)

    ref = logp(lay.k.float())
    out = {}
    for spec in specs:
        k_hat, nbytes = code_keys(make_codec(spec), prompt)
        lp = logp(torch.cat([k_hat.float(), lay.k[:, :, ctx:].float()], 2))
        kl = (ref.exp() * (ref - lp)).nan_to_num(0.0).sum(-1).mean()
        out[spec] = (float(kl), nbytes * 8 / prompt.k.numel())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", required=True, help='key codecs, "spec;spec"')
    ap.add_argument("--starts", default="30000,90000", help="token offsets of the windows in the essays")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--continuation", type=int, default=128)
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    specs = [s.strip() for s in args.specs.split(";") if s.strip()]
    for s in specs:
        make_codec(s)  # one-line SpecError before the model loads
    try:
        starts = [int(x) for x in args.starts.split(",")]
    except ValueError:
        raise SpecError(f"--starts: give comma-separated token offsets, got {args.starts!r}") from None
    from kvshrink.data import load_text
    from kvshrink.models import load_model

    t0 = time.time()
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    ids = torch.tensor(tok(load_text(), add_special_tokens=False).input_ids, dtype=torch.long)
    span = args.context + args.continuation
    if any(s < 0 or s + span > ids.numel() for s in starts):
        raise SpecError(f"--starts: each offset must be in 0..{ids.numel() - span} for this context")
    per = {s: {"kl": [], "bits": []} for s in specs}
    prompt_q = _query_positions(args.context, 48)
    q_pos = torch.cat([prompt_q, torch.arange(args.context, span)])
    for st in starts:
        cap = capture(model, ids[st : st + span].unsqueeze(0), q_pos, keep_logits="last")
        sums = {s: [0.0, 0.0] for s in specs}
        for lay in cap.layers:
            for s, (kl, bits) in layer_kls(lay, args.context, prompt_q.numel(), specs).items():
                sums[s][0] += kl
                sums[s][1] += bits / len(cap.layers)
        for s in specs:
            per[s]["kl"].append(sums[s][0])
            per[s]["bits"].append(sums[s][1])
        print(f"window at {st} done ({time.time() - t0:.0f} s)", flush=True)
    rows = [
        {
            "spec": s,
            "key_bits": sum(per[s]["bits"]) / len(starts),
            "kl_sum_layers": sum(per[s]["kl"]) / len(starts),
            "kl_windows": per[s]["kl"],
        }
        for s in specs
    ]
    data = {
        "model": "smollm2-135m",
        "context": args.context,
        "continuation": args.continuation,
        "starts": starts,
        "rows": rows,
        "seconds": time.time() - t0,
    }
    out = Path(args.out)
    write_json(out / f"{STEM}.json", data)
    lines = [
        "# Key codings at equal bytes: attention KL of held-out queries, SmolLM2-135M",
        "",
        f"Windows at {', '.join(map(str, starts))} ({args.context} prompt tokens); the {args.continuation} "
        "continuation queries attend over the coded prompt keys and their own exact keys; values exact. "
        "KL(exact || coded) averaged over query positions and heads, summed over the 30 layers, "
        "averaged over windows. Key bits per coordinate count codes, norms, fp16 sinks and every stored "
        "basis or coefficient (not the shared codebook). Regenerate: `benchmarks/key_coding_screen.py`.",
        "",
        "| key codec | key bits | KL (sum over layers) | per window |",
        "|---|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['spec']}` | {r['key_bits']:.3f} | {r['kl_sum_layers']:.4f} | "
            + ", ".join(f"{x:.4f}" for x in r["kl_windows"])
            + " |"
        )
    atomic_write(out / f"{STEM}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    from kvshrink.cli.common import run_cli

    sys.exit(run_cli(main))
