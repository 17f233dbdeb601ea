"""Long-context targets on SmolLM2-135M: kvshrink vs kvpress at 4x and 8x (issue 5, items 3-4).

Runs the target rows in one process on the same cases: the uncompressed ``DynamicCache``,
every kvpress press (StreamingLLM, SnapKV, Knorm, ExpectedAttention, TOVA) at ratio 0.75 and
0.875 (4x and 8x fewer tokens), and the kvshrink candidates for each level, on the needle
(``niah_single``, 2048 tokens) and two-turn (``multiturn:turns=2``, 1024 tokens) tasks, lengths
where the uncompressed model scored >= 80% on CPU. The verdict per level compares the best
kvshrink row whose measured total compression ratio is at least every press's at that level
with the strongest press, per task and length; the target is a lead of >= 30 points at 8x.

Cases run case-major (case i for every method, then case i + 1), so a run stopped by
``--max-minutes`` still compares all methods on the same cases; the JSON/md/png are
rewritten after every case round.

    PYTHONPATH=src python benchmarks/longbench_smollm2.py --device cuda --out docs/results
    PYTHONPATH=src python benchmarks/longbench_smollm2.py --smoke          # minutes on CPU
    PYTHONPATH=src python benchmarks/longbench_smollm2.py --render         # md/png from the JSON
    PYTHONPATH=src python benchmarks/longbench_smollm2.py --recall --out docs/results  # ArkVale, 8x resident

Size knob: ``--cases`` (50 for the targets) and ``--max-minutes``; the runtime is about
(methods x tasks x lengths x cases) case runs, printed after the first round with a projection.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from kvshrink.core.atomic import atomic_write
from kvshrink.data import load_text
from kvshrink.eval.chat import ChatPrompt
from kvshrink.eval.kvpress_peer import PRESSES, kvpress_available
from kvshrink.eval.longbench import CaseResult, run_case, summarize
from kvshrink.eval.longbench_methods import build_longbench_method
from kvshrink.eval.longbench_report import longbench_markdown, plot_longbench
from kvshrink.eval.report import write_json
from kvshrink.models import load_model
from kvshrink.tasks import Haystack, make_task, tokenizer_counter

STEM = "longbench-smollm2"
#: task -> lengths where the uncompressed model scored >= 80% on CPU (docs/results/longbench-smollm2-notes.md)
#: (4-turn sessions score 65-70% uncompressed at 512-1024 tokens; 2 turns scored 12/12 at 1024)
TARGETS = {"niah_single": (2048,), "multiturn:turns=2": (1024,)}
#: level (x fewer bytes) -> kvpress ratio (fraction removed) and the kvshrink candidates for it.
#: Small packed blocks and no extra fp16 window keep the fp16 share low enough to match the
#: presses' measured ratios (they keep the question whole: 3.6x and 6.35x at 1024 tokens).
#: 8x needs < 2 bits on average; uniform 1.5 bits loses the needle's digits, so the candidates
#: spend the bits unevenly between keys and values (CPU, 3 cases: 1/3 and 1/2 retrieved).
#: the six most key-sensitive layers of SmolLM2 (docs/results/layer-sensitivity-smollm2.md)
_KEYS = "10,11,18-20,23"
#: the twelve most key-sensitive (same table, 1.5-bit keys): K19 K10 K23 K20 K11 K18 K26 K24 K8 K17 K16 K15
_KEYS12 = "8,10,11,15-20,23,24,26"
LEVELS = {
    4: (
        0.75,
        [
            "fibquant:b=3,k=2+cache:window=0,block=64",
            "fibquant:b=2.5,k=4,kb=3,vb=2+cache:window=0,block=64",
        ],
    ),
    8: (
        0.875,
        [
            # per-layer (codecs/plan.py): 3-bit keys on the layers whose key error moves the model
            # most (docs/results/layer-sensitivity-smollm2.md), 1-bit values wherever value error
            # does not matter (every layer but 0-1). The first row was the best of five on the
            # 50-case needle and two-turn H100 runs (60.0% at 7.29x, 41.0% at 6.88x); the other
            # two spend the headroom above the presses' measured ratio (7.07x at 2048, 6.37x at
            # 1024 tokens: they keep the question whole) on keys: 2.5 bits elsewhere, or 3 bits
            # on the twelve most key-sensitive layers. Uniform rates measured lower (34-58% at
            # 7.17-7.26x, longbench-smollm2-needle8x.md).
            f"layers:at=[{_KEYS}],key=[fibquant:b=3,k=4]+layers:at=[0-1],value=[fibquant:b=1.5,k=4]"
            "+fibquant:k=4,kb=2.25,vb=1+cache:window=0,block=32",
            f"layers:at=[{_KEYS}],key=[fibquant:b=3,k=4]+layers:at=[0-1],value=[fibquant:b=1.5,k=4]"
            "+fibquant:k=4,kb=2.5,vb=1+cache:window=0,block=32",
            f"layers:at=[{_KEYS12}],key=[fibquant:b=3,k=4]+layers:at=[0-1],value=[fibquant:b=1.5,k=4]"
            "+fibquant:k=4,kb=2.25,vb=1+cache:window=0,block=32",
            # the first plan with keys in a basis fitted to the prompt's queries (white=4; a 12-case
            # CPU screen at kb=2: 50% at 7.43x, and the uniform kb=2,vb=1 row 17% -> 33%); on the
            # 50 two-turn sessions (CPU, --add): 48.0% at 6.70x, the first row 30+ points above
            # the strongest press (15.0%)
            f"layers:at=[{_KEYS}],key=[fibquant:b=3,k=4,white=4]+layers:at=[0-1],value=[fibquant:b=1.5,k=4,white=4]"
            "+fibquant:k=4,kb=2.25,vb=1,white=4+cache:window=0,block=32",
        ],
    ),
}

#: ArkVale at >= 8x fewer *resident* bytes (issue 5: needle accuracy within 5 points of the
#: uncompressed cache). 512 resident tokens per KV head of ~2100, every page packed by FibQuant at
#: 4 bits; the host backup keeps every page, so the total ratio is the codec's alone. fp16 pages
#: cannot get there: their digests and partial page cap ArkVale near 5x resident at budget 256
#: (page 16), which lost a third of the needles (longbench-smollm2-notes.md). ``group=max`` lets
#: the one query head that wants a page recall it (the mean dilutes a retrieval head among
#: three); ``digest=box`` (Quest's min/max) keeps a needle's outlier key visible. The first row is
#: the best measured: pages of 16 (31 recalled pages instead of 15: the lost needles were lost
#: digit by digit, their later digits in pages that 32-token digests ranked out) with int8
#: digests (``dbits=8``), which pay for the doubled page count and keep the row above 8x.
RECALL_LEVEL = 8.0
RECALL = [
    "arkvale:budget=512,page=16,group=max,digest=box,dbits=8+fibquant:b=4,k=2",
    "arkvale:budget=512,group=max,digest=box+fibquant:b=4,k=2",
    "arkvale:budget=512,group=max+fibquant:b=4,k=2",
    "arkvale:budget=512+fibquant:b=4,k=2",
]


def recall_verdict(rows: list[dict]) -> list[dict]:
    """Per task and length: each recall row at >= RECALL_LEVEL resident vs the uncompressed one."""
    out = []
    for task, length in dict.fromkeys((r["task"], r["length"]) for r in rows):
        here = {r["method"]: r for r in rows if r["task"] == task and r["length"] == length}
        if "none" not in here:
            continue
        for name, r in here.items():
            if name == "none":
                continue
            gap = r["accuracy"] - here["none"]["accuracy"]
            out.append(
                {
                    "task": task,
                    "length": length,
                    "method": name,
                    "accuracy": r["accuracy"],
                    "none_accuracy": here["none"]["accuracy"],
                    "resident_ratio": r["resident_ratio"],
                    "compression_ratio": r["compression_ratio"],
                    "gap_points": gap,
                    "met": r["resident_ratio"] >= RECALL_LEVEL and gap >= -5.0,
                }
            )
    return out


def recall_markdown(v: list[dict]) -> str:
    lines = [
        f"## Target: recall at >= {RECALL_LEVEL:g}x resident, within 5 points of the uncompressed cache",
        "",
        "| task | length | method | acc | none | gap | resident | total | met |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in v:
        lines.append(
            f"| {r['task']} | {r['length']} | `{r['method']}` | {r['accuracy']:.1f} | {r['none_accuracy']:.1f} | "
            f"{r['gap_points']:+.1f} | {r['resident_ratio']:.2f}x | {r['compression_ratio']:.2f}x | "
            f"{'yes' if r['met'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def method_specs(levels: dict, with_kvpress: bool) -> list[str]:
    specs = ["none"]
    for ratio, candidates in levels.values():
        specs += candidates
        if with_kvpress:
            specs += [f"kvpress/{p}:ratio={ratio:g}" for p in PRESSES]
    return list(dict.fromkeys(specs))


def verdict(rows: list[dict], levels: dict) -> list[dict]:
    """Per level, task and length: the best kvshrink row at >= the presses' ratio vs each press."""
    out = []
    for level, (ratio, candidates) in levels.items():
        for task, length in dict.fromkeys((r["task"], r["length"]) for r in rows):
            here = [r for r in rows if r["task"] == task and r["length"] == length]
            presses = [
                r for r in here if r["method"].startswith("kvpress/") and r["method"].endswith(f"={ratio:g}")
            ]
            if not presses:
                continue
            need = max(r["compression_ratio"] for r in presses)
            ours = [r for r in here if r["method"] in candidates and r["compression_ratio"] >= need]
            if not ours:
                out.append(
                    {"level": level, "task": task, "length": length, "best": None, "ratio_needed": need}
                )
                continue
            best = max(ours, key=lambda r: r["accuracy"])
            strongest = max(presses, key=lambda r: r["accuracy"])
            out.append(
                {
                    "level": level,
                    "task": task,
                    "length": length,
                    "best": best["method"],
                    "best_accuracy": best["accuracy"],
                    "best_ratio": best["compression_ratio"],
                    "ratio_needed": need,
                    "strongest_press": strongest["method"],
                    "press_accuracy": strongest["accuracy"],
                    "lead_points": best["accuracy"] - strongest["accuracy"],
                }
            )
    return out


TOTAL_LEVEL = 8.0  # issue 5: needle accuracy >= 80% at >= 8x total reduction (policy and codec)
TOTAL_TARGET = 80.0


def total_verdict(rows: list[dict]) -> list[dict]:
    """Per task and length: the most accurate kvshrink row at >= 8x *total* bytes (backup included)."""
    out = []
    for task, length in dict.fromkeys((r["task"], r["length"]) for r in rows):
        ours = [
            r
            for r in rows
            if (r["task"], r["length"]) == (task, length)
            and r["method"] != "none"
            and not r["method"].startswith("kvpress/")
            and r["compression_ratio"] >= TOTAL_LEVEL
        ]
        best = max(ours, key=lambda r: r["accuracy"], default=None)
        out.append(
            {
                "task": task,
                "length": length,
                "best": best and best["method"],
                "accuracy": best and best["accuracy"],
                "ratio": best and best["compression_ratio"],
                "met": bool(best and best["accuracy"] >= TOTAL_TARGET),
            }
        )
    return out


def total_markdown(v: list[dict]) -> str:
    lines = [
        f"## Target: accuracy >= {TOTAL_TARGET:g}% at >= {TOTAL_LEVEL:g}x total reduction",
        "",
        "The most accurate kvshrink row whose total bytes (every backup, digest, window and codebook "
        f"counted) are at most 1/{TOTAL_LEVEL:g} of the fp16 cache's.",
        "",
        "| task | length | best kvshrink at >= 8x total | acc | ratio | met |",
        "|---|---:|---|---:|---:|---|",
    ]
    for r in v:
        if r["best"] is None:
            lines.append(f"| {r['task']} | {r['length']} | none reaches {TOTAL_LEVEL:g}x | | | no |")
            continue
        lines.append(
            f"| {r['task']} | {r['length']} | `{r['best']}` | {r['accuracy']:.1f} | {r['ratio']:.2f}x | "
            f"{'yes' if r['met'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def verdict_markdown(v: list[dict]) -> str:
    lines = [
        "## Targets: best kvshrink row vs the strongest kvpress press",
        "",
        "Per level, the kvshrink candidate with the best accuracy among those whose total compression "
        "ratio is at least every press's at that level; lead in accuracy points (target: >= 30 at 8x).",
        "",
        "| level | task | length | best kvshrink | acc | ratio | strongest press | acc | lead |",
        "|---:|---|---:|---|---:|---:|---|---:|---:|",
    ]
    for r in v:
        if r["best"] is None:
            lines.append(
                f"| {r['level']}x | {r['task']} | {r['length']} | none reaches {r['ratio_needed']:.2f}x | | | | | |"
            )
            continue
        lines.append(
            f"| {r['level']}x | {r['task']} | {r['length']} | `{r['best']}` | {r['best_accuracy']:.1f} | "
            f"{r['best_ratio']:.2f}x | `{r['strongest_press']}` | {r['press_accuracy']:.1f} | {r['lead_points']:+.1f} |"
        )
    return "\n".join(lines) + "\n"


def render(data: dict, out: Path, stem: str = STEM) -> str:
    md = longbench_markdown(data, "Long-context accuracy on SmolLM2-135M: kvshrink vs kvpress")
    if data.get("verdict"):
        md += "\n" + verdict_markdown(data["verdict"])
    if data.get("recall_verdict"):
        md += "\n" + recall_markdown(data["recall_verdict"])
    data["total_verdict"] = total_verdict(data["rows"])
    md += "\n" + total_markdown(data["total_verdict"])
    md += f"\nDevice {data.get('device', '?')}, {data.get('seconds', 0):.0f} s; generated by `benchmarks/longbench_smollm2.py`.\n"
    for a in data.get("added", []):
        md += (
            f"Added later on the same cases (`--add`), device {a['device']}, {a['seconds']:.0f} s: "
            + ", ".join(f"`{m}`" for m in a["methods"])
            + ".\n"
        )
    write_json(out / f"{stem}.json", data)
    atomic_write(out / f"{stem}.md", md)
    try:
        plot_longbench(data, out / f"{stem}.png", "SmolLM2-135M: long-context accuracy, kvshrink vs kvpress")
    except ImportError:  # a host without matplotlib: re-render later with --render
        pass
    return md


def _load(args, methods: list) -> tuple:
    """Model on its device (each method checked against it first), chat prompt and haystack."""
    model, tok = load_model(args.model)
    model.to(args.device)
    for m in methods:
        if hasattr(m, "check"):
            m.check(model)
    return model, tok, ChatPrompt.from_tokenizer(tok), Haystack(load_text(args.text), tokenizer_counter(tok))


def add_rows(args, out: Path, stem: str) -> int:
    """Measure new candidates on the very cases of a saved run and merge their rows into it.

    Cases are generated from the task seed, the case index and the haystack, so rerunning
    cases 0..n-1 reproduces the saved run's prompts exactly (the CPU rerun of the H100 rows
    matched them to the case); the rows already there are kept as measured, the new ones
    carry the device they ran on, and the verdict is recomputed over all of them.
    """
    path = out / f"{stem}.json"
    if not path.exists():
        raise SystemExit(f"--add: no saved run {path}; give the --out and --stem of an earlier run")
    data = json.loads(path.read_text())
    specs = [build_longbench_method(x.strip()) for x in args.add.split(";") if x.strip()]
    names = [m.name for m in specs]
    tasks = [make_task(t) for t in data["tasks"]]
    model, tok, prompt, hay = _load(args, specs)
    lengths = sorted({(r["task"], r["length"]) for r in data["rows"]})
    n = int(data["cases"])
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    t0 = time.time()
    results: list[CaseResult] = []
    for task in tasks:
        for spec, length in lengths:
            if spec != task.spec:
                continue
            for i, case in enumerate(task.cases(hay, length, n)):
                for m in specs:
                    results.append(run_case(model, tok, prompt, m, case))
                print(f"{task.spec} {length}: case {i + 1}/{n}, {time.time() - t0:.0f} s", file=sys.stderr)
    new = summarize(results)
    for r in new:
        r["device"] = device
    _merge(data, new, [{"methods": names, "device": device, "seconds": time.time() - t0}])
    print(render(data, out, stem))
    return 0


def _merge(data: dict, new: list[dict], added: list[dict]) -> None:
    """Put rows measured later into a saved run as candidates of its levels; verdict recomputed."""
    names = list(dict.fromkeys(r["method"] for r in new))
    data["rows"] = [r for r in data["rows"] if r["method"] not in names] + new
    data["methods"] = [m for m in data["methods"] if m not in names] + names
    for lv in data["levels"].values():
        lv["candidates"] = [c for c in lv["candidates"] if c not in names] + names
    levels = {int(k): (v["kvpress_ratio"], v["candidates"]) for k, v in data["levels"].items()}
    data["verdict"] = verdict(data["rows"], levels)
    data.setdefault("added", []).extend(added)


def merge_files(out: Path, stem: str, files: list[str]) -> int:
    """Join rows that ``--add`` measured into copies of this run elsewhere (another machine, or
    parallel processes each given its own copy) back into the saved run: rows not already in it
    are taken, with the copy's record of where and how long they ran."""
    path = out / f"{stem}.json"
    if not path.exists():
        raise SystemExit(f"--merge: no saved run {path}; give the --out and --stem of an earlier run")
    data = json.loads(path.read_text())
    for f in files:
        fp = Path(f)
        if not fp.is_file():
            raise SystemExit(f"--merge: {f} is not a file; give saved run JSONs made by --add")
        other = json.loads(fp.read_text())
        for key in ("tasks", "cases", "lengths"):
            if other.get(key) != data.get(key):
                raise SystemExit(
                    f"--merge: {f} has {key}={other.get(key)!r}, the saved run {data.get(key)!r}; "
                    "only copies of the same run can be joined"
                )
        known = set(data["methods"])
        new = [r for r in other["rows"] if r["method"] not in known]
        names = {r["method"] for r in new}
        added = [a for a in other.get("added", []) if names & set(a["methods"])]
        _merge(data, new, added)
    print(render(data, out, stem))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/results")
    ap.add_argument(
        "--model", default="smollm2-135m", help="embedded name, .gguf or HF folder (same weights)"
    )
    ap.add_argument("--text", default="paul-graham", help="haystack: embedded name, .txt file or folder")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way)")
    ap.add_argument("--cases", type=int, default=50, help="cases per task and length (the size knob)")
    ap.add_argument("--lengths", default="", help="override every task's target lengths, e.g. 1024,2048")
    ap.add_argument("--tasks", default=";".join(TARGETS), help='task specs "a;b" (default: the target tasks)')
    ap.add_argument(
        "--candidates", default="", help='extra kvshrink rows "spec;spec" (searched for the best)'
    )
    ap.add_argument(
        "--max-minutes", type=float, default=0.0, help="stop before a case round that would end past this"
    )
    ap.add_argument("--levels", default="4,8", help="compression levels to run (of 4,8)")
    ap.add_argument(
        "--level-rows",
        type=int,
        default=0,
        help="only the first N kvshrink candidates of each level (0: all)",
    )
    ap.add_argument("--stem", default="", help="output file stem (default longbench-smollm2)")
    ap.add_argument(
        "--recall",
        action="store_true",
        help="the recall target instead of the levels: none + ArkVale rows at >= 8x resident, needle only "
        "(stem longbench-smollm2-recall8x)",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue from the per-case results saved in --out by an earlier run of the same methods and tasks",
    )
    ap.add_argument(
        "--only",
        default="",
        help='with --recall: run these ArkVale rows "spec;spec" instead of the listed ones',
    )
    ap.add_argument(
        "--add",
        default="",
        help='run only these kvshrink rows "spec;spec" on the cases of the saved --stem JSON in --out and '
        "merge them into it as candidates of its levels (rows measured later, or on another device)",
    )
    ap.add_argument(
        "--merge",
        default="",
        help="comma-separated JSONs of copies of the --stem run that --add extended elsewhere: "
        "their new rows are joined into it",
    )
    ap.add_argument("--smoke", action="store_true", help="1 case at 512 tokens, to check the script")
    ap.add_argument("--render", action="store_true", help="only re-render md/png from the JSON in --out")
    args = ap.parse_args()
    out = Path(args.out)
    stem = (args.stem or (f"{STEM}-recall8x" if args.recall else STEM)) + ("-smoke" if args.smoke else "")
    if args.render:
        print(render(json.loads((out / f"{stem}.json").read_text()), out, stem))
        return 0
    if args.add:
        return add_rows(args, out, stem)
    if args.merge:
        return merge_files(out, stem, [f for f in args.merge.split(",") if f.strip()])
    override = tuple(int(x) for x in args.lengths.split(",") if x.strip())
    cases_n = args.cases
    if args.smoke:
        override, cases_n = (512,), 1
    extra = [s.strip() for s in args.candidates.split(";") if s.strip()]
    # canonical names, as the rows print them
    wanted = {int(x) for x in args.levels.split(",") if x.strip()}
    if not wanted or not wanted <= set(LEVELS):
        raise SystemExit(f"--levels: expected a subset of {sorted(LEVELS)}, got {args.levels!r}")
    if args.level_rows < 0:
        raise SystemExit(f"--level-rows: expected a count >= 0 (0: every candidate), got {args.level_rows}")
    chosen = {k: (r, c[: args.level_rows or None]) for k, (r, c) in LEVELS.items() if k in wanted}
    levels = {k: (r, [build_longbench_method(x).name for x in c + extra]) for k, (r, c) in chosen.items()}
    if not kvpress_available():
        print(
            "kvpress is not installed: kvpress rows are skipped (pip install --no-deps kvpress)",
            file=sys.stderr,
        )
    if args.recall:
        levels = {}
        only = [x.strip() for x in args.only.split(";") if x.strip()]
        specs = ["none", *(only or RECALL), *extra]
        task_specs = args.tasks if args.tasks != ";".join(TARGETS) else "niah_single"
    else:
        specs = method_specs(levels, kvpress_available())
        task_specs = args.tasks
    methods = [build_longbench_method(s) for s in specs]
    tasks = [make_task(t) for t in task_specs.split(";")]
    t0 = time.time()
    model, tok, prompt, hay = _load(args, methods)
    lengths = {t.spec: override or TARGETS.get(t.spec, (1024,)) for t in tasks}
    blocks = [(t, n, t.cases(hay, n, cases_n)) for t in tasks for n in lengths[t.spec]]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results: list[CaseResult] = []
    data: dict = {}
    per_round = len(methods) * len(blocks)
    raw = out / f"{stem}-cases.json"  # every case's result, so a run cut by a time limit can go on
    first = 0
    if args.resume and raw.exists():
        saved = json.loads(raw.read_text())
        if saved["methods"] != [m.name for m in methods] or saved["tasks"] != [t.spec for t in tasks]:
            raise SystemExit(f"--resume: {raw} holds other methods or tasks; run without --resume")
        results = [CaseResult(**r) for r in saved["results"]]
        first = len(results) // per_round
        results = results[: first * per_round]
        t0 -= saved.get("seconds", 0.0)
        print(f"resuming after {first} cases from {raw}", file=sys.stderr)
        if first >= cases_n:
            raise SystemExit(f"--resume: {raw} already holds {first} >= --cases {cases_n} cases")
    print(f"{len(methods)} methods x {len(blocks)} task/length blocks x {cases_n} cases", file=sys.stderr)
    t_run = time.time()  # --max-minutes counts this run only
    for i in range(first, cases_n):
        t_round = time.time()
        for _, _, cases in blocks:
            for m in methods:
                results.append(run_case(model, tok, prompt, m, cases[i]))
        rows = summarize(results)
        data = {
            "model": "smollm2-135m",
            "device": device,
            "accuracy_unit": "percent",
            "bytes": "fp16 reference over bytes held after context + first question; dense tensors at 2 B/elem",
            "cases": i + 1,
            "lengths": sorted({n for ns in lengths.values() for n in ns}),
            "tasks": [t.spec for t in tasks],
            "methods": [m.name for m in methods],
            "levels": {str(k): {"kvpress_ratio": r, "candidates": c} for k, (r, c) in levels.items()},
            "rows": rows,
            "verdict": verdict(rows, levels),
            "recall_verdict": recall_verdict(rows) if args.recall else [],
            "seconds": time.time() - t0,
        }
        render(data, out, stem)
        keep = {"methods": data["methods"], "tasks": data["tasks"], "seconds": data["seconds"]}
        keep["results"] = [dataclasses.asdict(r) for r in results]
        atomic_write(raw, json.dumps(keep))
        spent = (time.time() - t0) / 60
        print(
            f"round {i + 1}/{cases_n}: {time.time() - t_round:.1f} s; projected total "
            f"{spent + (cases_n - i - 1) * (time.time() - t_round) / 60:.1f} min",
            file=sys.stderr,
        )
        this_run = (time.time() - t_run) / 60
        if args.max_minutes and this_run + (time.time() - t_round) / 60 > args.max_minutes:
            print(f"stopping after {i + 1} cases (--max-minutes {args.max_minutes})", file=sys.stderr)
            break
    print(render(data, out, stem))
    return 0


if __name__ == "__main__":
    from kvshrink.cli.common import run_cli

    sys.exit(run_cli(main))
