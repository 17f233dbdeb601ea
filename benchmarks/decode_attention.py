"""How fast is decode attention over packed caches, against fp16 SDPA and the byte floor? (issue 6)

Llama-3-8B attention shape (Hq=32, Hkv=8, d=128), one new query per sequence, ``L`` tokens of
context of which the newest 128 stay fp16 (the window) and the rest are packed. For each codec
and (B, L) the Triton kernel is timed against ``scaled_dot_product_attention`` on the fp16 cache
(backend pinned to FLASH, else EFFICIENT: on torch 2.11 the default may pick cuDNN, which re-plans
per length). The byte floor is the bytes a kernel must read (every packed tensor, the window) over
the device-to-device copy bandwidth measured in the same run (bytes read + written / time).

Timing: each method is captured in a CUDA graph; every rep zeroes a 256 MiB buffer (flushing the
50 MB L2) outside the timed region, then replays the graph between two CUDA events; the median of
``--reps`` reps is reported after warm-up. Packed test data are random codes of the right layout
(speed does not depend on values); correctness is checked in the same run on encoded Gaussian data
against the fp32 reference at a smaller shape. TurboQuant/FibQuant use their layout with a seeded
Haar rotation and random codebook when their codecs are not registered.

Writes ``decode-attention-<gpu>.{json,md,png}`` into ``--out`` (atomically).

    PYTHONPATH=src python benchmarks/decode_attention.py --out docs/results
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvshrink.codecs import CODECS, Codec, CodecConfig, Packed, make_codec
from kvshrink.core import atomic_write, atomic_write_with
from kvshrink.kernels import Window, decode_attention, decode_attention_ref, encode_vq, layout_of
from kvshrink.kernels.encode import encode_vq_ref
from kvshrink.kernels.encode.pad import SEARCH_FLAGS, default_search, supported_searches

HQ, HKV, D, WIN = 32, 8, 128, 128
SHAPES = [(1, 32768), (8, 8192), (8, 32768), (32, 8192)]
METHODS = [
    "int4",
    "int8",
    "kivi:b=2",
    "kivi:b=4",
    "turboquant:b=2",
    "turboquant:b=3",
    "turboquant:b=4",
    "fibquant:b=2,k=2",
    "fibquant:b=2,k=4",
    "fibquant:b=1,k=4",
    "fibquant:b=1,k=8",
]
CONFIGS = [  # the sweep that set kernel.py's defaults (sub=True: the sub-stream kernel where it applies)
    {"BT": 128, "num_warps": 4, "num_stages": 2, "sub": True, "prefetch": False},
    {"BT": 64, "num_warps": 4, "num_stages": 2, "sub": True, "prefetch": False},
    {"BT": 128, "num_warps": 8, "num_stages": 2, "sub": True, "prefetch": False},
    {"BT": 64, "num_warps": 4, "num_stages": 3, "sub": True, "prefetch": False},
    {"BT": 128, "num_warps": 4, "num_stages": 2, "sub": False, "prefetch": False},
    # the general kernel with the next block's codes in flight (prefetch), and/or codewords by
    # tl.gather from a shared-memory codebook (gather); sub=None: the kernel kernel.py picks
    {"BT": 128, "num_warps": 4, "num_stages": 2, "sub": None, "prefetch": True},
    {"BT": 64, "num_warps": 4, "num_stages": 2, "sub": None, "prefetch": True},
    {"BT": 128, "num_warps": 4, "num_stages": 2, "sub": None, "prefetch": False, "gather": True},
    {"BT": 128, "num_warps": 4, "num_stages": 2, "sub": None, "prefetch": True, "gather": True},
    {"BT": 64, "num_warps": 4, "num_stages": 2, "sub": None, "prefetch": False, "gather": True},
]


# -- codecs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LayoutConfig(CodecConfig):
    name: ClassVar[str] = "layout"
    bits: int = 4
    vec: int = 1


class LayoutVQ(Codec):
    """TurboQuant/FibQuant packed layout with a seeded Haar rotation and random codebooks."""

    def __init__(self, bits: int, vec: int) -> None:
        super().__init__(_LayoutConfig(bits, vec))

    def rotation(self, d: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(d)
        q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        return (q * torch.sign(torch.diagonal(r))).float()

    def codebook(self, d: int, role: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(d + (role == "value"))
        return torch.randn(1 << self.config.bits, self.config.vec, generator=g) / math.sqrt(d)  # type: ignore[attr-defined]

    def _encode(self, x: torch.Tensor, role: str) -> Packed:
        d = x.shape[-1]
        rot, cb = self.rotation(d).to(x.device), self.codebook(d, role).to(x.device)
        codes, norm = encode_vq_ref(x, rot, cb)
        return Packed(self.spec, role, tuple(x.shape), x.dtype, {"codes": codes, "norm": norm})  # type: ignore[arg-type]

    def _decode(self, packed: Packed) -> torch.Tensor:
        raise NotImplementedError


def codec_for(method: str) -> tuple[Codec, str]:
    """The registered codec, or the layout stand-in for an unregistered TurboQuant/FibQuant spec."""
    name = method.split(":")[0]
    if name in CODECS:
        return make_codec(method), "registered"
    opts = dict(kv.split("=") for kv in method.split(":")[1].split(","))
    b, k = int(opts["b"]), int(opts.get("k", 1))
    return LayoutVQ(b * k, k), "layout stand-in"


def synthetic(codec: Codec, b: int, t: int, device: str) -> tuple[Packed, Packed]:
    """Random packed keys/values of ``t`` tokens in ``codec``'s layout."""
    out = []
    for role in ("key", "value"):
        lay = layout_of(codec, role, D)  # type: ignore[arg-type]
        tz = {"codes": torch.randint(0, 256, (b, HKV, t, lay.row_bytes(D)), dtype=torch.uint8, device=device)}
        if lay.kind == "vq":
            tz["norm"] = (torch.rand(b, HKV, t, device=device) * 4 + 8).half()
        elif lay.kind == "token":
            tz["scale"] = (torch.rand(b, HKV, t, D // lay.group, device=device) * 0.1).half()
            if lay.has_min:
                tz["min"] = (torch.randn(b, HKV, t, D // lay.group, device=device)).half()
        else:
            tz["scale"] = (torch.rand(b, HKV, t // lay.group, D, device=device) * 0.1).half()
            tz["min"] = torch.randn(b, HKV, t // lay.group, D, device=device).half()
        out.append(Packed(codec.spec, role, (b, HKV, t, D), torch.float16, tz))  # type: ignore[arg-type]
    return out[0], out[1]


def step_inputs(codec: Codec, b: int, n: int) -> tuple[Packed, Packed, torch.Tensor, Window, torch.Tensor]:
    """One decode step's inputs on the GPU: ``n - WIN`` random packed tokens, an fp16 query and
    a ``WIN``-token fp16 window per sequence."""
    pk, pv = synthetic(codec, b, n - WIN, "cuda")
    q = torch.randn(b, HQ, D, device="cuda").half()
    win = Window(
        torch.randn(b, HKV, WIN, D, device="cuda").half(),
        torch.randn(b, HKV, WIN, D, device="cuda").half(),
        torch.full((b,), WIN, device="cuda", dtype=torch.int32),
    )
    return pk, pv, q, win, torch.full((b,), n - WIN, device="cuda", dtype=torch.int32)


# -- timing ------------------------------------------------------------------------------------


class Timer:
    """CUDA-graph replay between CUDA events, L2 flushed before each rep, median in ms."""

    def __init__(self, reps: int) -> None:
        self.reps = reps
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    def __call__(self, fn, graph: bool = True) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        run = fn
        if graph:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
                with torch.cuda.graph(g, stream=s):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            run = g.replay
        times = []
        for _ in range(self.reps):
            self.flush.zero_()
            a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            z.record()
            times.append((a, z))
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(z) for a, z in times)


def copy_bandwidth(timer: Timer) -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second, TB/s."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = timer(functools.partial(dst.copy_, src), graph=False)
    return 2 * n / (ms * 1e-3) / 1e12


def pick_sdpa(q, k, v) -> tuple[str, object]:
    """First backend of FLASH, EFFICIENT that takes this GQA decode call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, be in (
        ("FLASH_ATTENTION", SDPBackend.FLASH_ATTENTION),
        ("EFFICIENT_ATTENTION", SDPBackend.EFFICIENT_ATTENTION),
    ):
        try:
            with sdpa_kernel([be]):
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            return name, be
        except RuntimeError:
            continue
    raise RuntimeError("neither FLASH nor EFFICIENT SDPA takes this call")


# -- checks ------------------------------------------------------------------------------------


def check_correctness(methods: list[str], configs: dict[str, dict] | None = None) -> list[dict]:
    """Kernel vs fp32 reference on encoded Gaussian data, varlen + window, B=3, T=800."""
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    b, t = 3, 800
    lengths = torch.tensor([800, 301, 1], device="cuda")
    wl = torch.tensor([128, 0, 17], device="cuda")
    for method in methods:
        codec, _ = codec_for(method)
        if method.startswith("kivi"):
            codec = make_codec(method + ",residual=0")
        k = torch.randn(b, HKV, t, D, device="cuda", generator=g).half()
        v = torch.randn(b, HKV, t, D, device="cuda", generator=g).half()
        k[..., :2] *= 6
        pk, pv = codec.encode(k, "key"), codec.encode(v, "value")
        q = torch.randn(b, HQ, D, device="cuda", generator=g).half()
        win = Window(
            torch.randn(b, HKV, WIN, D, device="cuda", generator=g).half(),
            torch.randn(b, HKV, WIN, D, device="cuda", generator=g).half(),
            wl,
        )
        cfg = (configs or {}).get(method)
        out = decode_attention(q, pk, pv, lengths, win, codec=codec, config=cfg).float()
        ref = decode_attention_ref(q.float(), pk, pv, lengths, win, codec=codec)
        ref16 = decode_attention_ref(q, pk, pv, lengths, win, codec=codec, compute_dtype=torch.float16)
        rel = float((out - ref).norm() / ref.norm())
        err, err16 = float((out - ref).abs().max()), float((ref16.float() - ref).abs().max())
        ok = bool(torch.isfinite(out).all()) and err <= 2 * err16 + 1e-3 and rel <= 1e-2
        rows.append(
            {
                "method": method,
                "config": cfg,
                "rel_err": rel,
                "max_err": err,
                "max_err_ref_fp16": err16,
                "ok": ok,
            }
        )
        print(
            f"check {method:22s} rel {rel:.2e} max {err:.2e} (fp16 ref {err16:.2e}) {'ok' if ok else 'FAIL'}"
        )
    return rows


def check_encode(methods: list[str]) -> list[dict]:
    """Fused encode vs the codec's own encode on the GPU (prefill chunk and a single token)."""
    rows = []
    g = torch.Generator(device="cuda").manual_seed(1)
    for method in methods:
        codec, _ = codec_for(method)
        if layout_of(codec, "key", D).kind != "vq":
            continue
        x = torch.randn(2, HKV, 1000, D, device="cuda", generator=g).half()
        p = codec.encode(x, "key")
        codes, norm = encode_vq(x, codec, "key")
        bad = int((codes != p.tensors["codes"]).any(-1).sum())
        bad_norm = int((norm != p.tensors["norm"]).sum())
        cap = (torch.zeros_like(codes), torch.zeros_like(norm))
        start = torch.tensor([5, 700], device="cuda", dtype=torch.int32)
        encode_vq(x[:, :, :1], codec, "key", out=cap, start=start)
        one = bool(
            torch.equal(cap[0][0, :, 5], codes[0, :, 0]) and torch.equal(cap[0][1, :, 700], codes[1, :, 0])
        )
        rows.append(
            {
                "method": method,
                "rows": x.numel() // D,
                "rows_differing": bad,
                "norms_differing": bad_norm,
                "single_token_ok": one,
            }
        )
        print(
            f"encode {method:22s} rows differing {bad}/{x.numel() // D}, norms differing {bad_norm}, token {one}"
        )
    return rows


# -- main --------------------------------------------------------------------------------------


def packed_bytes(pk: Packed, pv: Packed, win_bytes: int) -> int:
    return pk.nbytes() + pv.nbytes() + win_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--methods", default="", help="';'-separated specs (default: all)")
    ap.add_argument("--quick", action="store_true", help="one shape, no config sweep")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--configs", help="JSON list of launch configs to sweep instead of the built-in list")
    ap.add_argument(
        "--sweep-only",
        action="store_true",
        help="only the correctness checks and the config sweep at B=8, L=32k (decode-attention-sweep-<gpu>.json)",
    )
    ap.add_argument(
        "--encode-only",
        action="store_true",
        help="only the fused-encode check and timing (decode-attention-encode-<gpu>.{json,md})",
    )
    args = ap.parse_args()
    methods = [m for m in args.methods.split(";") if m] or METHODS
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    slug = next((s for s in ("h100", "h200", "a100", "l40s", "l4") if s in dev.lower()), "gpu")
    timer = Timer(args.reps)
    t_start = time.time()
    bw = copy_bandwidth(timer)
    print(f"device {dev}; copy bandwidth {bw:.3f} TB/s; torch {torch.__version__}")
    if args.encode_only:
        enc_checks = guarded("encode check", check_encode, methods) or []
        enc = guarded("encode bench", bench_encode, timer, methods, True)
        write_encode(args.out, f"decode-attention-encode-{slug}", dev, enc_checks, enc, time.time() - t_start)
        return
    checks = guarded("correctness", check_correctness, methods) or []
    enc_checks = [] if args.sweep_only else guarded("encode check", check_encode, methods) or []
    sweep_configs = json.loads(args.configs) if args.configs else CONFIGS

    shapes = SHAPES[2:3] if args.quick else SHAPES
    # config sweep at B=8, L=32k: keep the fastest per method
    best: dict[str, dict] = {}
    sweep: list[dict] = []
    b, L = 8, 32768
    for method in methods:
        codec, _ = codec_for(method)
        pk, pv, q, win, lengths = step_inputs(codec, b, L)
        configs = sweep_configs[:1] if (args.no_sweep or args.quick) else sweep_configs
        if layout_of(codec, "key", D).vec > 1:  # only the stream-major kernel takes vector codes
            configs = [c for c in configs if c.get("sub") is not False]
        if method == "turboquant:b=2" and not args.quick and not args.configs:
            configs = [*configs, {**CONFIGS[0], "select": True}]
        for cfg in configs:
            try:
                ms = timer(
                    functools.partial(decode_attention, q, pk, pv, lengths, win, codec=codec, config=cfg)
                )
            except Exception as e:  # a config that does not compile is skipped, and said so
                print(f"sweep {method} {cfg}: {type(e).__name__}: {str(e)[:200]}")
                continue
            sweep.append({"method": method, "config": cfg, "ms": ms})
            print(f"sweep {method:22s} {cfg} {ms * 1e3:8.1f} us")
            if method not in best or ms < best[method]["ms"]:
                best[method] = {"config": cfg, "ms": ms}
        del pk, pv

    best_cfg = {m: v["config"] for m, v in best.items()}
    checks += guarded("correctness (best configs)", check_correctness, methods, best_cfg) or []
    if args.sweep_only:
        for cfg in sweep_configs:  # every swept config must also be right, not only the fastest
            checks += (
                guarded("correctness (sweep)", check_correctness, methods, {m: cfg for m in methods}) or []
            )
        dense = [
            torch.randn(8, h, n, D, device="cuda").half() for h, n in ((HQ, 1), (HKV, 32768), (HKV, 32768))
        ]
        _, sdpa_ms = time_sdpa(timer, *dense)
        del dense
        print(f"sdpa-fp16 B=8 L=32768 {sdpa_ms * 1e3:8.1f} us")
        res = {"device": dev, "copy_bandwidth_TBps": bw, "reps": args.reps, "sdpa_fp16_ms": sdpa_ms}
        res |= {"sweep": sweep, "checks": checks, "torch": torch.__version__}
        atomic_write(os.path.join(args.out, f"decode-attention-sweep-{slug}.json"), json.dumps(res, indent=1))
        return
    rows: list[dict] = []
    details: list[dict] = []
    sdpa_backend = None
    for b, L in shapes:
        q = torch.randn(b, HQ, D, device="cuda").half()
        kf = torch.randn(b, HKV, L, D, device="cuda").half()
        vf = torch.randn(b, HKV, L, D, device="cuda").half()
        name, sdpa_ms = time_sdpa(timer, q.unsqueeze(2), kf, vf)
        sdpa_backend = sdpa_backend or name
        fp16_bytes = 2 * kf.numel() * 2
        rows.append(
            {
                "B": b,
                "L": L,
                "method": "sdpa-fp16",
                "ms": sdpa_ms,
                "speedup_vs_sdpa": 1.0,
                "pct_of_floor": 100 * fp16_bytes / (bw * 1e12) * 1e3 / sdpa_ms,
            }
        )
        details.append({"B": b, "L": L, "method": "sdpa-fp16", "bytes": fp16_bytes, "backend": name})
        print(
            f"B={b:2d} L={L:5d} sdpa-fp16 ({name}) {sdpa_ms * 1e3:8.1f} us  {rows[-1]['pct_of_floor']:.0f}% of floor"
        )
        win = Window(
            kf[:, :, L - WIN :].contiguous(),
            vf[:, :, L - WIN :].contiguous(),
            torch.full((b,), WIN, device="cuda", dtype=torch.int32),
        )
        del kf, vf
        lengths = torch.full((b,), L - WIN, device="cuda", dtype=torch.int32)
        for method in methods:
            codec, source = codec_for(method)
            pk, pv = synthetic(codec, b, L - WIN, "cuda")
            cfg = best.get(method, {"config": CONFIGS[0]})["config"]
            ms = guarded(
                method,
                timer,
                functools.partial(decode_attention, q, pk, pv, lengths, win, codec=codec, config=cfg),
            )
            if ms is None:
                continue
            nbytes = packed_bytes(pk, pv, 2 * win.keys.numel() * 2)
            floor_ms = nbytes / (bw * 1e12) * 1e3
            rows.append(
                {
                    "B": b,
                    "L": L,
                    "method": method,
                    "ms": ms,
                    "speedup_vs_sdpa": sdpa_ms / ms,
                    "pct_of_floor": 100 * floor_ms / ms,
                }
            )
            details.append(
                {
                    "B": b,
                    "L": L,
                    "method": method,
                    "bytes": nbytes,
                    "floor_ms": floor_ms,
                    "config": cfg,
                    "codec": source,
                }
            )
            print(
                f"B={b:2d} L={L:5d} {method:22s} {ms * 1e3:8.1f} us  x{sdpa_ms / ms:5.2f}  {100 * floor_ms / ms:5.1f}% of floor"
            )
            del pk, pv
        del win, q

    result: dict = {}
    for stage in ("grid", "encode", "quanto"):
        if stage == "encode":
            result["encode"] = guarded("encode bench", bench_encode, timer, methods)
        elif stage == "quanto":
            result["quanto"] = guarded("quanto", bench_quanto, timer, shapes)
        result.update(
            summary(dev, bw, rows, sdpa_backend, args.reps, details, sweep, checks, enc_checks, t_start)
        )
        write(args.out, f"decode-attention-{slug}", result)  # after each stage: a timeout keeps the rest


def summary(dev, bw, rows, sdpa_backend, reps, details, sweep, checks, enc_checks, t_start) -> dict:
    return {
        "device": dev,
        "copy_bandwidth_TBps": bw,
        "rows": rows,
        "sdpa_backend": sdpa_backend,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "timing": f"CUDA graph replay, L2 flushed (256 MiB memset) before each rep, median of {reps}",
        "window_tokens": WIN,
        "details": details,
        "sweep": sweep,
        "correctness": checks,
        "encode_checks": enc_checks,
        "wall_s": time.time() - t_start,
    }


def bench_encode(timer: Timer, methods: list[str], compare_search: bool = False) -> dict:
    """Fused encode of a 32k-token prefill (keys + values) vs that prefill's causal SDPA.

    ``compare_search``: also time the other nearest-codeword search (tensor cores or the
    CUDA-core loop, whichever the default is not) for vector codebooks, in the same run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    L = 32768
    q = torch.randn(1, HQ, L, D, device="cuda").half()
    k = torch.randn(1, HKV, L, D, device="cuda").half()
    v = torch.randn(1, HKV, L, D, device="cuda").half()

    def prefill():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    timer_few = Timer(10)
    prefill_ms = timer_few(prefill, graph=False)
    out: dict = {"prefill_tokens": L, "prefill_attention_ms": prefill_ms, "rows": []}
    print(f"prefill causal SDPA 32k: {prefill_ms:.2f} ms")
    for method in methods:
        codec, _ = codec_for(method)
        if layout_of(codec, "key", D).kind != "vq":
            continue
        ms = timer(lambda codec=codec: (encode_vq(k, codec, "key"), encode_vq(v, codec, "value")))
        x1 = torch.randn(8, HKV, 1, D, device="cuda").half()
        cap = (
            torch.empty(
                8, HKV, 4096, layout_of(codec, "key", D).row_bytes(D), dtype=torch.uint8, device="cuda"
            ),
            torch.empty(8, HKV, 4096, dtype=torch.float16, device="cuda"),
        )
        start = torch.full((8,), 100, device="cuda", dtype=torch.int32)
        one_ms = timer(functools.partial(encode_vq, x1, codec, "key", out=cap, start=start))
        lay = layout_of(codec, "key", D)
        row = {
            "method": method,
            "search": default_search(lay, D),
            "encode_ms": ms,
            "pct_of_prefill": 100 * ms / prefill_ms,
            "single_token_B8_ms": one_ms,
        }
        if compare_search:  # every search the layout supports, same run (the default's timed above)
            row["searches"] = {
                row["search"]: {f: row[f] for f in ("encode_ms", "pct_of_prefill", "single_token_B8_ms")}
            }
            for name in supported_searches(lay, D):
                if name == row["search"]:
                    continue
                mma, keyed = SEARCH_FLAGS[name]
                ms_s = timer(
                    lambda codec=codec, mma=mma, keyed=keyed: (
                        encode_vq(k, codec, "key", mma=mma, keyed=keyed),
                        encode_vq(v, codec, "value", mma=mma, keyed=keyed),
                    )
                )
                one_s = timer(
                    functools.partial(encode_vq, x1, codec, "key", out=cap, start=start, mma=mma, keyed=keyed)
                )
                row["searches"][name] = {
                    "encode_ms": ms_s,
                    "pct_of_prefill": 100 * ms_s / prefill_ms,
                    "single_token_B8_ms": one_s,
                }
        out["rows"].append(row)
        print(
            f"encode {method:22s} 32k K+V {ms * 1e3:8.1f} us = {100 * ms / prefill_ms:.2f}% of prefill; token {one_ms * 1e3:.1f} us"
        )
    return out


def bench_quanto(timer: Timer, shapes: list[tuple[int, int]]) -> dict:
    """transformers' QuantizedCache (quanto int4/int2) decode step: update + SDPA, if importable."""
    try:
        import optimum.quanto  # noqa: F401
        from transformers import QuantizedCache  # noqa: F401
    except Exception as e:
        return {"status": f"not run: {type(e).__name__}: {e}"}
    # quanto builds its CUDA extension (unpack + marlin/awq GEMMs) with nvcc on first use, minutes
    # of device time; its own pure-PyTorch unpack (same maths, slower than its kernel) stands in.
    from optimum.quanto.library.extensions import cuda as qcuda
    from transformers.cache_utils import QuantoQuantizedLayer

    def py_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
        per = 8 // bits
        parts = [(packed & (2 ** (bits * (i + 1)) - 1)) >> (bits * i) for i in range(per)]
        return torch.cat(parts).to(torch.uint8)

    qcuda.ext._lib = type("PyUnpack", (), {"unpack": staticmethod(py_unpack)})()

    res: dict = {"status": "ran", "rows": []}
    for nbits in (4, 2):
        for b, L in shapes:
            try:
                layer = QuantoQuantizedLayer(
                    nbits=nbits, axis_key=0, axis_value=0, q_group_size=64, residual_length=WIN
                )
                k = torch.randn(b, HKV, L, D, device="cuda").half()
                v = torch.randn(b, HKV, L, D, device="cuda").half()
                layer.update(k, v)
                del k, v
                kn = torch.randn(b, HKV, 1, D, device="cuda").half()
                q = torch.randn(b, HQ, 1, D, device="cuda").half()

                def step(layer=layer, kn=kn, q=q):
                    kk, vv = layer.update(kn, kn)
                    layer.keys, layer.values = layer.keys[:, :, :-1], layer.values[:, :, :-1]  # stay at L
                    return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)

                ms = timer(step, graph=False)
                res["rows"].append({"B": b, "L": L, "method": f"quanto-int{nbits}", "ms": ms})
                print(f"quanto int{nbits} B={b} L={L}: {ms * 1e3:.1f} us")
            except Exception as e:
                res["rows"].append(
                    {
                        "B": b,
                        "L": L,
                        "method": f"quanto-int{nbits}",
                        "error": f"{type(e).__name__}: {str(e)[:200]}",
                    }
                )
                print(f"quanto int{nbits} B={b} L={L}: {type(e).__name__}: {str(e)[:200]}")
            torch.cuda.empty_cache()
    return res


def write_encode(out_dir: str, stem: str, dev: str, checks: list, enc: dict | None, wall: float) -> None:
    """The ``--encode-only`` results: JSON and a Markdown table, each written atomically."""
    result = {
        "device": dev,
        "torch": torch.__version__,
        "encode_checks": checks,
        "encode": enc,
        "wall_s": wall,
    }
    lines = [f"# Fused encode of a 32k-token prefill: {dev}", ""]
    if enc:
        lines += [
            f"Keys + values, Hkv=8, d=128, against that prefill's causal SDPA ({enc['prefill_attention_ms']:.2f} ms, "
            "Hq=32); target: <= 10%. `other`: the searches the default does not use, same run (`loop`: "
            "CUDA cores; `mma`: tensor-core scores and an argmin; `keyed`: tensor-core scores keyed with the index).",
            "",
            "| method | search | µs | % of prefill | other search | µs | % of prefill | 1 token, B=8 (µs) |",
            "|---|---|---:|---:|---|---:|---:|---:|",
        ]
        for r in enc["rows"]:
            others = {n: v for n, v in r.get("searches", {}).items() if n != r["search"]}
            o = (
                "<br>".join(f"{n}" for n in others)
                + " | "
                + "<br>".join(f"{v['encode_ms'] * 1e3:.0f}" for v in others.values())
                + " | "
                + "<br>".join(f"{v['pct_of_prefill']:.1f}" for v in others.values())
                if others
                else "– | – | –"
            )
            lines.append(
                f"| `{r['method']}` | {r['search']} | {r['encode_ms'] * 1e3:.0f} | {r['pct_of_prefill']:.1f} | {o} | "
                f"{r['single_token_B8_ms'] * 1e3:.1f} |"
            )
    lines += ["", "Encode checks (fused kernel vs the codec's own encode):", ""]
    lines += [f"- {c}" for c in checks]
    atomic_write(os.path.join(out_dir, f"{stem}.json"), json.dumps(result, indent=1))
    atomic_write(os.path.join(out_dir, f"{stem}.md"), "\n".join(lines) + "\n")


def guarded(what: str, fn, *args):
    """Run one stage; a failure is printed and the rest of the run goes on."""
    try:
        return fn(*args)
    except Exception as e:
        print(f"FAILED {what}: {type(e).__name__}: {str(e)[:400]}")
        torch.cuda.synchronize()
        return None


def time_sdpa(timer: Timer, q4: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor) -> tuple[str, float]:
    """fp16 SDPA decode of ``q4`` [B, Hq, 1, d] over ``kf``/``vf``, backend pinned (:func:`pick_sdpa`):
    (backend name, ms)."""
    from torch.nn.attention import sdpa_kernel

    name, be = pick_sdpa(q4, kf, vf)

    def sdpa():
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q4, kf, vf, enable_gqa=True)

    return name, timer(sdpa)


def _extra_sections(result: dict) -> list[str]:
    """The fused-encode and transformers-QuantizedCache stages of the run, when they ran."""
    lines: list[str] = []
    enc = result.get("encode")
    if isinstance(enc, dict) and enc.get("rows"):
        lines += [
            "",
            f"## Fused encode of a {enc['prefill_tokens']}-token prefill (K and V, B=1)",
            "",
            f"Causal SDPA prefill attention: {enc['prefill_attention_ms']:.2f} ms (target: encode <= 10% of it).",
            "",
            "| method | nearest-codeword search | encode ms | % of prefill attention | one token, B=8 (µs) |",
            "|---|---|---:|---:|---:|",
        ]
        for r in enc["rows"]:
            lines.append(
                f"| {r['method']} | {r['search']} | {r['encode_ms']:.3f} | {r['pct_of_prefill']:.1f} | "
                f"{r['single_token_B8_ms'] * 1e3:.1f} |"
            )
    qt = result.get("quanto")
    if isinstance(qt, dict):
        lines += ["", "## transformers' QuantizedCache (quanto), one decode step: update + SDPA", ""]
        if qt.get("rows"):
            sdpa = {(r["B"], r["L"]): r["ms"] for r in result["rows"] if r["method"] == "sdpa-fp16"}
            lines += ["| B | L | method | µs | × SDPA |", "|---|---|---|---:|---:|"]
            for r in qt["rows"]:
                if "ms" not in r:
                    continue
                ref = sdpa.get((r["B"], r["L"]))
                ratio = f"{ref / r['ms']:.2f}" if ref else "–"
                lines.append(f"| {r['B']} | {r['L']} | {r['method']} | {r['ms'] * 1e3:.1f} | {ratio} |")
            if qt.get("note"):
                lines += ["", qt["note"]]
        else:
            lines.append(str(qt.get("status", "not run")))
    return lines


def write(out_dir: str, stem: str, result: dict) -> None:
    """JSON, Markdown table and PNG, each written atomically."""
    atomic_write(os.path.join(out_dir, f"{stem}.json"), json.dumps(result, indent=1))
    lines = [
        f"# Decode attention over packed caches: {result['device']}",
        "",
        f"Copy bandwidth {result['copy_bandwidth_TBps']:.2f} TB/s; SDPA backend {result['sdpa_backend']}; "
        f"{result['timing']}. Hq=32, Hkv=8, d=128, newest {WIN} tokens fp16."
        + (f" Launch configs: {result['configs']}." if result.get("configs") else ""),
        "",
        "| B | L | method | µs | × SDPA | % of byte floor |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['B']} | {r['L']} | {r['method']} | {r['ms'] * 1e3:.1f} | {r['speedup_vs_sdpa']:.2f} | "
            f"{r['pct_of_floor']:.0f} |"
        )
    lines += _extra_sections(result)
    atomic_write(os.path.join(out_dir, f"{stem}.md"), "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    shapes = sorted({(r["B"], r["L"]) for r in result["rows"]})
    methods = [m for m in dict.fromkeys(r["method"] for r in result["rows"])]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(shapes)
    for i, (b, L) in enumerate(shapes):
        ys = [
            next(
                (
                    r["speedup_vs_sdpa"]
                    for r in result["rows"]
                    if r["B"] == b and r["L"] == L and r["method"] == m
                ),
                0,
            )
            for m in methods
        ]
        ax.bar([j + i * width for j in range(len(methods))], ys, width, label=f"B={b}, L={L}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(methods))], methods, rotation=30, ha="right")
    ax.set_ylabel("speedup vs fp16 SDPA")
    ax.set_title(f"Decode attention over packed caches, {result['device']}")
    ax.legend()
    fig.tight_layout()
    atomic_write_with(
        os.path.join(out_dir, f"{stem}.png"), lambda tmp: fig.savefig(tmp, format="png", dpi=120)
    )


if __name__ == "__main__":
    from kvshrink.cli.common import run_cli

    sys.exit(run_cli(main))
