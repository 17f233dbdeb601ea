"""Launch one decode-attention kernel a few times at B=8, L=32k, for an external profiler.

Why: the SASS count (``kernel_sass.py``) said TurboQuant b=2 needs as many instructions per token
as int4, yet it takes twice as long (``decode-attention-h100-notes.md``); what stalls it is a
question for Nsight Compute, which needs a process that launches the kernel and little else::

    ncu --kernel-name regex:_split --launch-skip 3 --launch-count 1 --section WarpStateStats \\
        python benchmarks/decode_profile.py turboquant:b=2 --config '{"BT": 128}'

Data as in ``decode_attention.py`` (random codes of the codec's layout, a 128-token fp16 window).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decode_attention import codec_for, step_inputs
from kvshrink.cli.common import run_cli
from kvshrink.core.errors import InputError
from kvshrink.kernels import decode_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("method")
    ap.add_argument("--config", default="{}", help="decode launch knobs as JSON (choose.DecodeConfig)")
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=32768)
    args = ap.parse_args()
    try:
        cfg = json.loads(args.config)
    except json.JSONDecodeError as e:
        raise InputError(f'--config is not JSON ({e.msg}); give e.g. \'{{"BT": 64, "vq": true}}\'') from None
    if not isinstance(cfg, dict):
        raise InputError("--config must be a JSON object of launch knobs, e.g. '{\"BT\": 64}'")
    if not torch.cuda.is_available():
        raise InputError("decode_profile.py launches CUDA kernels: run it on a machine with a GPU")
    codec, _ = codec_for(args.method)
    pk, pv, q, win, lengths = step_inputs(codec, args.batch, args.length)
    for _ in range(args.launches):
        decode_attention(q, pk, pv, lengths, win, codec=codec, config=cfg)
    torch.cuda.synchronize()


if __name__ == "__main__":
    sys.exit(run_cli(main))
