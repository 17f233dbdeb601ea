"""``kvshrink frontier``: measure codecs on a real model's cache and write json/md/png."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["DEFAULT_METHODS", "QUICK", "add_parser", "run"]

DEFAULT_METHODS = "int8;int4;kivi:b=4;kivi:b=2"
QUICK = {"context": 1024, "windows": 3}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("frontier", help="compression ratio vs fidelity for codec specs")
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="embedded name (smollm2-135m, gemma3-270m), .gguf or HF folder",
    )
    p.add_argument(
        "--text", default="paul-graham", help="embedded text name, a .txt file or a folder of .txt"
    )
    p.add_argument("--methods", default=None, help=f'specs separated by ";" (default "{DEFAULT_METHODS}")')
    p.add_argument(
        "--context", type=int, default=None, help="prefill tokens per window (default 2048; quick 1024)"
    )
    p.add_argument(
        "--windows", type=int, default=None, help="windows spread over the text (default 6; quick 3)"
    )
    p.add_argument("--out", default="results", help="output folder for frontier.{json,md,png}")
    p.add_argument("--quick", action="store_true", help="smaller run: under 3 minutes on 2 CPU cores")
    p.set_defaults(func=run)


def _pick(value: int | None, default: int) -> int:
    return default if value is None else value


def _load(name: str):
    """The model loader (one seam, so tests reuse the session's already-loaded model)."""
    from ..models import load_model

    return load_model(name)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..core.spec import split_specs
    from ..data import load_text
    from ..eval.frontier import FrontierConfig, run_frontier, window_starts
    from ..eval.methods import build_method, family
    from ..eval.plots import plot_frontier
    from ..eval.report import frontier_markdown, write_json
    from .common import progress_bar

    cfg = FrontierConfig(
        context=_pick(args.context, QUICK["context"] if args.quick else 2048),
        windows=_pick(args.windows, QUICK["windows"] if args.quick else 6),
    )
    methods = [build_method(s) for s in split_specs(args.methods or DEFAULT_METHODS)]  # fail fast
    text = load_text(args.text)
    from ..models import resolve_model

    resolve_model(args.model)  # a bad path or architecture fails before the slow load
    t0 = time.time()
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tok = _load(args.model)
    head_dim = (
        getattr(model.config, "head_dim", None)
        or model.config.hidden_size // model.config.num_attention_heads
    )
    for m in methods:  # a head dim the codec cannot split fails before any compute
        (m.codec if hasattr(m, "codec") else m).check_dim(head_dim)
    ids = torch.tensor(tok(text, add_special_tokens=False).input_ids, dtype=torch.long)
    window_starts(ids.numel(), cfg)  # validates the text length before any compute
    torch.manual_seed(0)
    result = run_frontier(model, ids, methods, cfg, args.model, progress=progress_bar("frontier"))
    data = result.to_json()
    out = Path(args.out)
    md = frontier_markdown(data)
    # everything is computed before anything is written; each file lands atomically
    write_json(out / "frontier.json", data)
    from ..core.atomic import atomic_write

    atomic_write(out / "frontier.md", md)
    plot_frontier(data, out / "frontier.png", family)
    print(md)
    print(f"wrote {out}/frontier.{{json,md,png}} in {time.time() - t0:.0f}s", file=sys.stderr)
    return 0
