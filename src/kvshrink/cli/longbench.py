"""``kvshrink longbench``: long-context accuracy of cache methods on generated tasks, json/md/png."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["DEFAULT_METHODS", "QUICK", "add_parser", "parse_lengths", "run"]

DEFAULT_METHODS = "none;kivi:b=4;kivi:b=2;snapkv:ratio=0.5+fp16;streamingllm:ratio=0.5+fp16"
DEFAULT_LENGTHS = "1024,2048,4096"
QUICK = {"tasks": "niah_single;multiturn:turns=2", "lengths": "512", "cases": 2, "methods": "none;kivi:b=2"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("longbench", help="long-context task accuracy (RULER/SCBench-style) per cache method")
    p.add_argument(
        "--model", default="smollm2-135m", help="embedded name, .gguf or HF folder (an instruct model)"
    )
    p.add_argument(
        "--text", default="paul-graham", help="haystack: embedded text name, a .txt file or a folder"
    )
    p.add_argument(
        "--methods",
        default=None,
        help=f'specs separated by ";": none, CompressedCache specs, kvpress/<Press>:ratio=R (default "{DEFAULT_METHODS}")',
    )
    p.add_argument("--tasks", default=None, help='task specs separated by ";" (default: the whole suite)')
    p.add_argument("--lengths", default=None, help=f"context lengths in tokens (default {DEFAULT_LENGTHS})")
    p.add_argument("--cases", type=int, default=None, help="cases per task and length (default 20)")
    p.add_argument("--out", default="results", help="output folder for longbench.{json,md,png}")
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way)")
    p.add_argument("--replies", action="store_true", help="keep every reply and its scores in the JSON")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small run: niah_single + 2-turn multiturn, 512 tokens, 2 cases, none;kivi:b=2",
    )
    p.set_defaults(func=run)


def parse_lengths(text: str) -> tuple[int, ...]:
    from ..core.errors import SpecError

    try:
        lengths = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SpecError(f"--lengths must be integers separated by ',', got {text!r}") from None
    if not lengths:
        raise SpecError("--lengths is empty: expected e.g. 1024,2048")
    return lengths


def _load(name: str):
    """The model loader (one seam, so tests reuse the session's already-loaded model)."""
    from ..models import load_model

    return load_model(name)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..core.errors import ModelError
    from ..core.spec import split_specs
    from ..data import load_text
    from ..eval.longbench import LongbenchConfig, run_longbench
    from ..eval.longbench_methods import build_longbench_method
    from ..models import resolve_model
    from ..tasks import DEFAULT_TASKS, Haystack, tokenizer_counter
    from .common import progress_bar

    quick = QUICK if args.quick else {}
    cfg = LongbenchConfig(
        tasks=tuple(split_specs(args.tasks or quick.get("tasks") or ";".join(DEFAULT_TASKS))),
        lengths=parse_lengths(args.lengths or quick.get("lengths") or DEFAULT_LENGTHS),
        cases=args.cases if args.cases is not None else quick.get("cases", 20),
    )
    methods = [
        build_longbench_method(s)
        for s in split_specs(args.methods or quick.get("methods") or DEFAULT_METHODS)
    ]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    text = load_text(args.text)
    resolve_model(args.model)  # a bad path or architecture fails before the slow load
    t0 = time.time()
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tok = _load(args.model)
    model.to(args.device)
    hay = Haystack(text, tokenizer_counter(tok))
    data = run_longbench(
        model,
        tok,
        methods,
        cfg,
        hay,
        args.model,
        progress=progress_bar("longbench"),
        keep_replies=args.replies,
    )
    from ..core.atomic import atomic_write
    from ..eval.longbench_report import longbench_markdown, plot_longbench
    from ..eval.report import write_json

    out = Path(args.out)
    md = longbench_markdown(data)
    # everything is computed before anything is written; each file lands atomically
    write_json(out / "longbench.json", data)
    atomic_write(out / "longbench.md", md)
    plot_longbench(data, out / "longbench.png")
    print(md)
    print(f"wrote {out}/longbench.{{json,md,png}} in {time.time() - t0:.0f}s", file=sys.stderr)
    return 0
