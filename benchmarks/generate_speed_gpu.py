"""Decode speed of CompressedCache on a GPU: the Triton kernel path against the PyTorch path and
against DynamicCache with fp16 SDPA, in one run on one device.

For each ``BxL`` shape, ``B`` prompts of ``L - steps`` tokens (consecutive slices of the embedded
essays) are prefilled into each cache (``logits_to_keep=1``), then ``steps`` greedy single-token
forwards are timed with CUDA synchronisation (two warm-up steps first); tokens/s is
``B / median step``. Each spec runs twice: ``kernels=torch`` (the chunked PyTorch read path) and
``kernels=auto`` (one Triton decode-attention launch per layer, fused encode into a contiguous
store). DynamicCache runs with SDPA pinned to flash / memory-efficient / math: cuDNN re-plans for
every new length on this stack. The model runs in fp16.

Also recorded: prefill seconds, cache bytes (``memory_report().total`` against DynamicCache's
fp16 tensors), peak GPU memory above the weights, and the fraction of greedy tokens equal to
DynamicCache's (``fp16`` must give 1.0; the two paths of one spec should agree with each other).

Writes ``generate-speed-<gpu>.{json,md,png}`` into ``--out`` atomically.

    PYTHONPATH=src python benchmarks/generate_speed_gpu.py --model PATH.gguf --out docs/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache

from kvshrink.cache import CompressedCache
from kvshrink.core.atomic import atomic_write
from kvshrink.data import load_text
from kvshrink.eval.plots import save_png
from kvshrink.models import load_model

SPECS = "fp16;int4;kivi:b=2;turboquant:b=4;fibquant:b=2,k=4;fibquant:b=3,k=2"
SHAPES = "1x2048,1x8192,8x8192,32x4096"
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sync() -> None:
    torch.cuda.synchronize()


def run_one(model, ids: torch.Tensor, name: str, steps: int) -> tuple[dict[str, Any], torch.Tensor]:
    """Prefill + ``steps`` timed greedy steps; returns the row and the generated tokens."""
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    cache = DynamicCache(config=model.config) if name == "DynamicCache" else CompressedCache(model, name)
    with torch.no_grad(), sdpa_kernel(_BACKENDS):
        _sync()
        t = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        _sync()
        prefill = time.perf_counter() - t
        nxt = out.logits[:, -1:].argmax(-1)
        tokens, times, first = [nxt], [], None
        for step in range(steps + 2):
            _sync()
            t = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache)
            nxt = out.logits[:, -1:].argmax(-1)
            _sync()
            if first is None:
                first = out.logits[:, -1].float().cpu()  # the first decode step: compares the two paths
            if step >= 2:
                times.append(time.perf_counter() - t)
            tokens.append(nxt)
    if name == "DynamicCache":
        held = sum(t.numel() * 2 for layer in cache.layers for t in (layer.keys, layer.values))
        kernel = False
    else:
        held = cache.memory_report().total
        kernel = any(getattr(layer, "store", None) is not None for layer in cache.layers)
    med = statistics.median(times)
    row = {
        "method": name,
        "B": ids.shape[0],
        "L": ids.shape[1] + steps + 3,
        "kernel": kernel,
        "prefill_s": prefill,
        "step_ms": 1000 * med,
        "tokens_per_s": ids.shape[0] / med,
        "bytes": held,
        "peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20,
    }
    row["first_logits"] = first
    del cache, out
    return row, torch.cat(tokens, 1).cpu()


def profile(model, ids_all: torch.Tensor, shape: tuple[int, int], spec: str, steps: int) -> None:
    """Where a decode step's host time goes (the GPU is idle-bound at small batch)."""
    import cProfile
    import pstats

    b, ell = shape
    ids = ids_all[: b * ell].view(b, ell).cuda()
    for name in ("DynamicCache", spec):
        cache = DynamicCache(config=model.config) if name == "DynamicCache" else CompressedCache(model, name)
        with torch.no_grad(), sdpa_kernel(_BACKENDS):
            out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(3):
                out = model(input_ids=nxt, past_key_values=cache)
            _sync()
            prof = cProfile.Profile()
            t = time.perf_counter()
            prof.enable()
            for _ in range(steps):
                out = model(input_ids=nxt, past_key_values=cache)
            _sync()
            prof.disable()
        print(
            f"== {name}: {1000 * (time.perf_counter() - t) / steps:.1f} ms/step under the profiler",
            flush=True,
        )
        pstats.Stats(prof).sort_stats("cumtime").print_stats(35)


def agree(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).float().mean())


def markdown(data: dict[str, Any]) -> str:
    md = [
        f"# CompressedCache decode on {data['device']}: Triton kernels vs PyTorch reads vs DynamicCache\n",
        f"Model {data['model']} in fp16, torch {data['torch']}; {data['steps']} timed greedy steps per row "
        "(median), 2 warm-up steps; DynamicCache with fp16 SDPA (flash/efficient/math, cuDNN excluded). "
        "`kernels=auto` rows decode with one Triton launch per layer over a contiguous packed store; "
        "`kernels=torch` rows read packed blocks chunk by chunk in PyTorch. ratio = DynamicCache fp16 "
        "bytes / bytes held; agree = fraction of greedy tokens equal to DynamicCache's; "
        "paths agree = kernel vs torch path of the same spec; logit diff = their first decode step's max "
        "|Δlogit| / max |logit|.\n",
        "| B | L | method | path | step ms | tok/s | × Dynamic | × torch path | prefill s | ratio | peak MiB "
        "| agree | paths agree | logit diff |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        md.append(
            f"| {r['B']} | {r['L']} | `{r['spec']}` | {r['path']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} "
            f"| {r['vs_dynamic']:.2f} | {r.get('vs_torch_path', float('nan')):.2f} | {r['prefill_s']:.2f} "
            f"| {r['ratio']:.2f} | {r['peak_mib']:.0f} | {r['agree']:.2f} | {r.get('paths_agree', float('nan')):.2f} "
            f"| {r.get('first_step_rel_diff', float('nan')):.1e} |"
        )
    return "\n".join(md) + "\n"


def plot(data: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    shapes = list(dict.fromkeys(f"{r['B']}x{r['L']}" for r in rows))
    specs = [s for s in dict.fromkeys(r["spec"] for r in rows) if s != "DynamicCache"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, path_name in zip(axes, ("torch", "triton")):
        width = 0.8 / max(len(specs), 1)
        for i, spec in enumerate(specs):
            ys = []
            for shp in shapes:
                hit = [
                    r
                    for r in rows
                    if f"{r['B']}x{r['L']}" == shp and r["spec"] == spec and r["path"] == path_name
                ]
                ys.append(hit[0]["vs_dynamic"] if hit else 0.0)
            ax.bar([x + i * width for x in range(len(shapes))], ys, width, label=spec)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))], shapes)
        ax.set_title(f"CompressedCache, {path_name} path")
        ax.set_xlabel("batch x context")
    axes[0].set_ylabel("decode tokens/s vs DynamicCache (fp16 SDPA)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M decode on {data['device']}")
    fig.tight_layout()
    save_png(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="embedded name or .gguf path")
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated BxL")
    ap.add_argument("--specs", default=SPECS, help="';'-separated codec specs (each run on both paths)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--render", help="only rewrite .md/.png from this saved .json")
    ap.add_argument(
        "--profile", help="cProfile the host side of decode steps of this cache spec (first shape)"
    )
    args = ap.parse_args()
    if args.render:
        with open(args.render) as f:
            data = json.load(f)
        base = args.render.removesuffix(".json")
        atomic_write(base + ".md", markdown(data))
        plot(data, base + ".png")
        return
    if not torch.cuda.is_available():
        raise SystemExit("generate_speed_gpu: needs a CUDA device (the CPU benchmark is generate_speed.py)")
    model, tok = load_model(args.model, dtype=torch.float16)
    model.to("cuda")
    text = load_text("paul-graham")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    need = max(b * ell for b, ell in shapes)
    ids_all = tok(text[: 6 * need], return_tensors="pt").input_ids[0]
    specs = args.specs.split(";")
    device = torch.cuda.get_device_name()
    if args.profile:
        profile(model, ids_all, shapes[0], args.profile, args.steps)
        return
    data: dict[str, Any] = {
        "device": device,
        "model": args.model,
        "torch": torch.__version__,
        "steps": args.steps,
    }
    rows: list[dict[str, Any]] = []
    for b, ell in shapes:
        n = ell - args.steps - 3
        ids = torch.stack([ids_all[(i * n) % (ids_all.numel() - n) :][:n] for i in range(b)]).cuda()
        print(f"B={b} L={ell}", flush=True)
        dyn, dyn_tokens = run_one(model, ids, "DynamicCache", args.steps)
        dyn.update(spec="DynamicCache", path="sdpa", vs_dynamic=1.0, ratio=1.0, agree=1.0)
        dyn.pop("first_logits")
        rows.append(dyn)
        for spec in specs:
            pair = {}
            for path_name, kern in (("torch", "torch"), ("triton", "auto")):
                row, tokens = run_one(model, ids, f"{spec}+cache:kernels={kern}", args.steps)
                row.update(
                    spec=spec,
                    path=path_name if row["kernel"] or kern == "torch" else "torch (no kernel)",
                    vs_dynamic=row["tokens_per_s"] / dyn["tokens_per_s"],
                    ratio=dyn["bytes"] / row["bytes"],
                    agree=agree(tokens, dyn_tokens),
                )
                pair[path_name] = (row, tokens)
                rows.append(row)
                print(
                    f"  {spec:24s} {path_name:6s} {row['step_ms']:8.1f} ms  x{row['vs_dynamic']:.2f} "
                    f"prefill {row['prefill_s']:.2f}s ratio {row['ratio']:.2f} agree {row['agree']:.2f}",
                    flush=True,
                )
            (rt, tt), (rk, tk) = pair["torch"], pair["triton"]
            if rk["kernel"]:
                rk["vs_torch_path"] = rk["tokens_per_s"] / rt["tokens_per_s"]
            rk["paths_agree"] = agree(tt, tk)
            diff = (rk["first_logits"] - rt["first_logits"]).abs().max() / rt["first_logits"].abs().max()
            rk["first_step_rel_diff"] = float(diff)
            print(
                f"  first decode step, kernel vs torch path: max rel logit diff {float(diff):.2e}", flush=True
            )
            rt.pop("first_logits"), rk.pop("first_logits")
        data["rows"] = rows
        os.makedirs(args.out, exist_ok=True)
        short = device.split()[1].lower() if len(device.split()) > 1 else "gpu"  # "NVIDIA H100 ..." -> h100
        base = os.path.join(args.out, f"generate-speed-{short}")
        atomic_write(base + ".json", json.dumps(data, indent=1))
        atomic_write(base + ".md", markdown(data))
    plot(data, base + ".png")
    print(markdown(data))


if __name__ == "__main__":
    from kvshrink.cli.common import run_cli

    sys.exit(run_cli(main))
