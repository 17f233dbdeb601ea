"""Count the SASS of the decode-attention kernels for sm_90 on a machine without a GPU.

Why: device time is scarce and the kernels are bound by instructions per dequantized element
(``docs/results/decode-attention-h100-notes.md``), so the instruction count of the main loop is
the number to drive down before timing anything. Triton ships ``ptxas`` and ``nvdisasm``; a
stand-in driver that reports an sm_90 target lets the real launcher run its specialization and
compile path (``warmup``: nothing launches), on CPU tensors of the real codecs.

    PYTHONPATH=src python benchmarks/kernel_sass.py int4 turboquant:b=4 kivi:b=2
    PYTHONPATH=src python benchmarks/kernel_sass.py int4 --config '{"sub": false}' --dump /tmp/sass

Per kernel it prints registers, spills, total SASS and the SASS of the innermost hot loop
(the largest span closed by a backward branch), per token of one KV head per warp, and the
instruction mix of that loop.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


class _Driver:
    """Just enough of Triton's CUDA driver for ``JITFunction.run(warmup=True)``."""

    def __init__(self, cap: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", cap, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def is_active(self) -> bool:
        return True


def _capture(cap: int) -> list:
    """Make every launch compile only; return the list the compiled kernels are appended to."""
    import triton
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(_Driver(cap))
    seen: list = []
    orig = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        k = orig(self, *args, grid=grid, warmup=True, **kwargs)
        seen.append((self.fn.__name__, k, dict(zip((p.name for p in self.params), args))))
        return k

    JITFunction.run = run  # type: ignore[method-assign]
    assert triton  # imported for its side effects on the driver registry
    return seen


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def sass_of(kernel) -> tuple[str, int, int]:
    """SASS text, registers per thread and spill-stack bytes of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run(
            [_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True
        ).stdout
        res = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    reg = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    return sass, int(reg.group(1)) if reg else -1, int(stack.group(1)) if stack else -1


_INSN = re.compile(r"^\s*(?:/\*[0-9a-f]+\*/)?\s*(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", re.M)
_LABEL = re.compile(r"^\.(L_x_\d+):", re.M)
_BRA = re.compile(r"BRA\s+(?:`\()?\.?(L_x_\d+)")


def blocks_per_sm(regs: int, smem: int, warps: int) -> int:
    """Resident programs per SM on sm_90: 64K registers (allocated per warp in 256s), 227 KB of
    shared memory per block at most 228 KB per SM (1 KB reserved per block), 64 warps, 32 blocks."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = 65536 // (per_warp * warps)
    by_smem = 233472 // (smem + 1024) if smem else 32
    return max(0, min(by_regs, by_smem, 64 // warps, 32))


def hot_loop(sass: str) -> list[str]:
    """Instructions of the largest loop body (label .. backward branch to it)."""
    lines = sass.splitlines()
    where: dict[str, int] = {}
    for i, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            where[m.group(1)] = i
    best: tuple[int, int] = (0, 0)
    for i, line in enumerate(lines):
        m = _BRA.search(line)
        if m and m.group(1) in where and where[m.group(1)] < i:
            s = where[m.group(1)]
            if i - s > best[1] - best[0]:
                best = (s, i)
    body = lines[best[0] : best[1] + 1]
    found = (_INSN.match(x) for x in body if not x.lstrip().startswith("."))
    return [m.group(2) for m in found if m]


def inputs(method: str, b: int, t: int, hkv: int, g: int, d: int):
    sys.path.insert(0, str(Path(__file__).parent))
    from decode_attention import codec_for

    codec, _ = codec_for(method)
    torch.manual_seed(0)
    k = torch.randn(b, hkv, t, d)
    v = torch.randn(b, hkv, t, d)
    pk, pv = codec.encode(k, "key"), codec.encode(v, "value")
    q = torch.randn(b, hkv * g, d).half()
    return codec, q, pk, pv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("methods", nargs="+")
    ap.add_argument("--config", default="{}", help="decode launch knobs as JSON (choose.DecodeConfig)")
    ap.add_argument("--cap", type=int, default=90)
    ap.add_argument("--dump", help="folder for the SASS of each kernel")
    ap.add_argument("--window", action="store_true", help="launch with a recent fp16 window")
    ap.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    ap.add_argument(
        "--encode",
        action="store_true",
        help="the fused encode kernel instead (config keys: mma, keyed, block, num_warps, maxnreg); its hot loop is the codeword search",
    )
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    seen = _capture(args.cap)
    from kvshrink.kernels.decode_attn import Window
    from kvshrink.kernels.decode_attn.kernel import decode_attention_triton

    cfg = json.loads(args.config)
    rows = []
    for method in args.methods:
        codec, q, pk, pv = inputs(method, 1, 256, 2, 4, 128)
        win = None
        if args.window:
            w = torch.randn(1, 2, 16, 128).half()
            win = Window(w, w, torch.tensor([16]))
        seen.clear()
        if args.encode:
            from kvshrink.kernels.encode import encode_vq

            encode_vq(
                torch.randn(1, 2, 64, 128),
                codec,
                "key",
                backend="triton",
                mma=cfg.get("mma"),
                keyed=cfg.get("keyed"),
                block=cfg.get("block"),
                num_warps=cfg.get("num_warps"),  # None: the launch encode_vq would pick
                maxnreg=cfg.get("maxnreg"),
            )
        else:
            decode_attention_triton(q, pk, pv, torch.tensor([256]), win, codec, None, cfg)
        for name, k, bound in seen:
            if not name.startswith("_split" if not args.encode else "_encode"):
                continue
            sass, regs, stack = sass_of(k)
            smem = int(k.metadata.shared)
            occ = blocks_per_sm(regs, smem, k.metadata.num_warps)
            loop = hot_loop(sass)
            bt = int(bound["BT"] if "BT" in bound else bound["BM"])
            nwarps = k.metadata.num_warps
            mix = collections.Counter(op.split(".")[0] for op in loop)
            top = ", ".join(f"{op} {n}" for op, n in mix.most_common(12))
            per_token = len(loop) * nwarps / bt
            unit = "vector and loop trip" if args.encode else "token"
            rows.append(
                {
                    "method": method,
                    "kernel": name,
                    "regs": regs,
                    "stack": stack,
                    "smem": smem,
                    "blocks_per_sm": occ,
                    "sass": len(_INSN.findall(sass)),
                    "loop": len(loop),
                    "num_warps": nwarps,
                    "BT": bt,
                    "warp_instr_per_token": per_token,
                    "loop_mix": dict(mix),
                }
            )
            if not args.json:
                print(
                    f"{method:24s} {name:18s} regs {regs:3d} stack {stack:3d} smem {smem // 1024:3d}K "
                    f"blocks/SM {occ} sass {rows[-1]['sass']:5d} "
                    f"loop {len(loop):5d} (x{nwarps} warps = {per_token:.1f} warp-instr per {unit} at {bt} per block)"
                )
                print(f"    {top}")
            if args.dump:
                Path(args.dump).mkdir(parents=True, exist_ok=True)
                stem = Path(args.dump) / f"{method.replace(':', '_').replace(',', '_')}-{name}"
                stem.with_suffix(".sass").write_text(sass)
                for ir in ("ttgir", "ptx"):
                    stem.with_suffix("." + ir).write_text(k.asm[ir])
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    from kvshrink.cli.common import run_cli

    sys.exit(run_cli(main))
