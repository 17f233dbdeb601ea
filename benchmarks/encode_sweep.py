"""Launch sweep of the fused encode on a GPU: search, rows per program, warps, register cap.

The encode of a 32k-token prefill (keys and values, Llama-3-8B's 8 KV heads of 128) is the issue-6
target (<= 10% of that prefill's causal attention, 25.6 ms on the H100 of
``decode-attention-encode-h100.json``; pass the measured one as ``PREFILL_MS``). Each config is
timed like ``decode_attention.py`` (CUDA graph, L2 flushed, median) and its codes compared with the
first config's (near-ties may differ). Writes ``encode-regs-sweep.json`` into ``$OUT`` after every
row, so a run cut short keeps what it measured.

    OUT=/tmp PYTHONPATH=src python benchmarks/encode_sweep.py
"""

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_attention import HKV, D, Timer, codec_for
from kvshrink.kernels import encode_vq

out_dir = os.environ.get("OUT", "/tmp")
timer = Timer(15)
L = 32768
k = torch.randn(1, HKV, L, D, device="cuda").half()
v = torch.randn(1, HKV, L, D, device="cuda").half()
PREFILL_MS = float(os.environ.get("PREFILL_MS", "25.6"))
LOOP = [(32, 8), (64, 8), (64, 4), (128, 4), (128, 8), (32, 4), (16, 4)]  # (rows per program, warps)
plans = {
    "fibquant:b=2,k=4": [
        *({"search": "loop", "block": bm, "warps": w} for bm, w in LOOP),
        {"search": "loop", "block": 64, "warps": 4, "maxnreg": 128},
        {"search": "keyed", "block": 16, "warps": 8},
        {"search": "keyed", "block": 16, "warps": 8, "maxnreg": 128},
        {"search": "keyed", "block": 32, "warps": 8},
    ],
    "fibquant:b=1,k=8": [
        {"search": "keyed", "block": 32, "warps": 8},
        {"search": "keyed", "block": 16, "warps": 4},
        {"search": "keyed", "block": 32, "warps": 8, "maxnreg": 128},
        *({"search": "loop", "block": bm, "warps": w} for bm, w in LOOP[:4]),
    ],
    "fibquant:b=2,k=2": [{"search": "loop", "block": bm, "warps": w} for bm, w in LOOP[:4]],
}
rows = []
for method, cfgs in plans.items():
    codec, _ = codec_for(method)
    ref = None
    for cfg in cfgs:

        def run(cfg=cfg, codec=codec):
            keyed = cfg["search"] == "keyed"
            opts = {"block": cfg["block"], "num_warps": cfg["warps"], "maxnreg": cfg.get("maxnreg")}
            return [
                encode_vq(x, codec, role, backend="triton", mma=keyed, keyed=keyed, **opts)[0]
                for x, role in ((k, "key"), (v, "value"))
            ]

        try:
            t0 = time.time()
            codes = run()
            comp = time.time() - t0
            ms = timer(run)
        except Exception as e:
            print(f"{method} {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        if ref is None:
            ref = codes
        diff = sum(int((a != b).any(-1).sum()) for a, b in zip(codes, ref))
        row = {
            "method": method,
            **cfg,
            "ms": ms,
            "pct_of_prefill": 100 * ms / PREFILL_MS,
            "rows_differing_vs_first": diff,
            "compile_s": round(comp, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(out_dir, "encode-regs-sweep.json"), "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "prefill_ms_assumed": PREFILL_MS, "rows": rows},
                f,
                indent=1,
            )
