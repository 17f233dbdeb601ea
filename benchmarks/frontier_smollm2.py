"""Does FibQuant's frontier reproduce on SmolLM2-135M? (issue 4)

Two measurements on the embedded model and essays, context 2048, all rows of a phase measured
on the same windows in one run:

- ``frontier``: the full rate axis for FibQuant (k = 2, 4, 8), TurboQuant, KIVI, int4/int8,
  transformers' QuantizedCache (``hf-quanto``), plus ablations (no Lloyd refinement, random
  instead of quasi-uniform directions, k) and the beyond-paper options (sinks, pre-RoPE keys,
  key/value rates, centring). One rotation seed, ``--frontier-windows`` windows.
- ``targets``: the rows the issue's targets are judged on, each over ``--seeds`` rotation seeds
  and ``--target-windows`` windows. Per window the seeds are averaged; the standard error is
  over windows (the text varies more than the rotation); the seed spread is reported beside it.

Writes ``frontier-smollm2.{json,md,png}`` into ``--out`` atomically. Perplexity deltas are
continuation perplexity (256 teacher-forced tokens after the compressed 2048-token prefix)
minus the uncompressed cache's on the same windows.

    PYTHONPATH=src python benchmarks/frontier_smollm2.py --out docs/results
    PYTHONPATH=src python benchmarks/frontier_smollm2.py --smoke   # minutes, small, for checking
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from kvshrink.core.atomic import atomic_write
from kvshrink.data import load_text
from kvshrink.eval.frontier import FrontierConfig, run_frontier
from kvshrink.eval.methods import family
from kvshrink.eval.plots import plot_frontier
from kvshrink.eval.report import frontier_markdown, write_json
from kvshrink.models import load_model

FRONTIER = [
    # FibQuant over the rate axis, one curve per k
    *(f"fibquant:b={b},k=2" for b in (1, 1.5, 2, 2.5, 3, 4)),
    *(f"fibquant:b={b},k=4" for b in (0.5, 0.75, 1, 1.5, 2, 2.5)),
    *(f"fibquant:b={b},k=8" for b in (0.5, 0.75, 1)),
    *(f"turboquant:b={b}" for b in (1, 2, 3, 4)),
    "kivi:b=2",
    "kivi:b=4",
    "int4",
    "int8",
    "hf-quanto:b=4",
    "hf-quanto:b=2",
    # ablations of the construction (b = 2 unless said)
    "fibquant:b=2,k=4,lloyd=0",
    "fibquant:b=2,k=4,dirs=random,lloyd=0",
    "fibquant:b=2,k=4,dirs=random",
    "fibquant:b=1,k=8,lloyd=0",
    "turboquant:b=2,qjl=1",
    # beyond the paper
    "fibquant:b=2,k=4,sinks=1",
    "fibquant:b=2,k=4,prerope=1",
    "fibquant:b=2,k=4,center=1",
    "fibquant:b=2,k=4,kb=2.5,vb=1.5",
    "fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,prerope=1",
    "turboquant:b=2,sinks=1,prerope=1",
]

# name -> spec without seed; each is run with seed=0..S-1 (peers have no seed)
# [P5]'s allocation at 5.92x nominal (layer_sensitivity.py --allocate --ratio 5.92, same options):
# 2% more compression, which heavy tokens spend again
P592 = "layers:at=[0],codec=[fibquant:b=2,k=4,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[1],codec=[fibquant:b=2,k=4,kb=2.5,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[2,14],codec=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[3,5,6,10],codec=[fibquant:b=2,k=4,kb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[7,17,18,20,23],codec=[fibquant:b=2,k=4,kb=3.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[8],codec=[fibquant:b=2,k=4,kb=3.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[9],codec=[fibquant:b=2,k=4,kb=3,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[11,12,16,22,29],codec=[fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[13,27],codec=[fibquant:b=2,k=4,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[24],codec=[fibquant:b=2,k=4,kb=3,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[25],codec=[fibquant:b=2,k=4,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8"

# the same plan with a rate per KV head (benchmarks/head_sensitivity.py: each layer's KL curve
# split by its heads' shares, docs/results/head-sensitivity-smollm2-*.json), allocated at 5.95x
H595 = "layers:at=[0,1],codec=[fibquant:b=2,k=4,kb=2.5,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[4,11,13,16],codec=[fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[5,6,10],codec=[fibquant:b=2,k=4,kb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[8,17],codec=[fibquant:b=2,k=4,kb=3.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[9,19,21,22],codec=[fibquant:b=2,k=4,kb=3,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[12,18],codec=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[14,15,28],codec=[fibquant:b=2,k=4,kb=2.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[23,24],codec=[fibquant:b=2,k=4,kb=3.5,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[25,27],codec=[fibquant:b=2,k=4,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[29],codec=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[0,4],heads=[0],value=[fibquant:b=2,k=4,kb=2.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[0,11],heads=[1],value=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[0],heads=[2],key=[fibquant:b=2,k=4,kb=1.5,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[1],heads=[0],key=[fibquant:b=2,k=4,kb=3,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[1,14,16],heads=[2],value=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[2],heads=[0],key=[fibquant:b=2,k=4,kb=3,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3.5,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[2],heads=[2],key=[fibquant:b=2,k=4,kb=2.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[3],heads=[0],value=[fibquant:b=2,k=4,kb=3.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[3],heads=[2],key=[fibquant:b=2,k=4,kb=3,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[5],heads=[1],key=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[6],heads=[0],key=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[7,19],heads=[0],key=[fibquant:b=2,k=4,kb=2.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[7],heads=[1],key=[fibquant:b=2,k=4,kb=3,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[7,23],heads=[2],value=[fibquant:b=2,k=4,kb=3.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[8],heads=[1],value=[fibquant:b=2,k=4,kb=3.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[9],heads=[0],key=[fibquant:b=2,k=4,kb=3.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[9],heads=[1],value=[fibquant:b=2,k=4,kb=3,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[9],heads=[2],value=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[10],heads=[0],value=[fibquant:b=2,k=4,kb=3.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[10,29],heads=[1],key=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[10],heads=[2],key=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[11],heads=[2],key=[fibquant:b=2,k=4,kb=3,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[12],heads=[1],value=[fibquant:b=2,k=4,kb=2.5,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[12],heads=[2],value=[fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[13],heads=[1],key=[fibquant:b=2,k=4,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[14],heads=[1],key=[fibquant:b=2,k=4,kb=3.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[15],heads=[0],value=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[15],heads=[2],key=[fibquant:b=2,k=4,kb=3.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[17],heads=[0],key=[fibquant:b=2,k=4,kb=3,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[17],heads=[2],key=[fibquant:b=2,k=4,kb=2.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[18],heads=[2],key=[fibquant:b=2,k=4,kb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=2.5,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[19,22],heads=[1],value=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[19],heads=[2],key=[fibquant:b=2,k=4,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[20],heads=[1],value=[fibquant:b=2,k=4,kb=3.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[21],heads=[0],value=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[22],heads=[0],key=[fibquant:b=2,k=4,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[23],heads=[1],key=[fibquant:b=2,k=4,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[24],heads=[0],value=[fibquant:b=2,k=4,kb=3.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[24],heads=[1],value=[fibquant:b=2,k=4,kb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[25],heads=[0],key=[fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[25],heads=[1],value=[fibquant:b=2,k=4,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[26],heads=[0],key=[fibquant:b=2,k=4,kb=3,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[26],heads=[2],key=[fibquant:b=2,k=4,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3.5,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[28],heads=[1],key=[fibquant:b=2,k=4,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=2.5,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[29],heads=[0],key=[fibquant:b=2,k=4,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[29],heads=[2],value=[fibquant:b=2,k=4,kb=3,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+fibquant:b=2,k=4,kb=3.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8"
# the same with a KL-vs-rate curve of its own for every head (head files at 5 key and 6 value
# rates) instead of layer curves split by shares, allocated at 5.95x
C595 = "layers:at=[0,18],codec=[fibquant:b=2,k=4,kb=2.5,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[1,6,10,29],codec=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[3,14,20,26],codec=[fibquant:b=2,k=4,kb=3.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[4,11],codec=[fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[5,9],codec=[fibquant:b=2,k=4,kb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[12,16],codec=[fibquant:b=2,k=4,kb=3,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[13],codec=[fibquant:b=2,k=4,kb=2.5,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[15],codec=[fibquant:b=2,k=4,kb=2.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[19,28],codec=[fibquant:b=2,k=4,kb=2.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[21],codec=[fibquant:b=2,k=4,kb=3,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[22],codec=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[24],codec=[fibquant:b=2,k=4,kb=3,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[25],codec=[fibquant:b=2,k=4,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[27],codec=[fibquant:b=2,k=4,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[0],heads=[0],key=[fibquant:b=2,k=4,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=2.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[0,11,18,19],heads=[1],value=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[0],heads=[2],key=[fibquant:b=2,k=4,kb=1.5,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[1],heads=[1],value=[fibquant:b=2,k=4,kb=3,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[1],heads=[2],key=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[2],heads=[0],key=[fibquant:b=2,k=4,kb=2.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[2],heads=[2],key=[fibquant:b=2,k=4,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[3],heads=[0],value=[fibquant:b=2,k=4,kb=3.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[4],heads=[0],key=[fibquant:b=2,k=4,kb=3,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[5,9],heads=[0],value=[fibquant:b=2,k=4,kb=3.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[5,9],heads=[1],key=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[6],heads=[1],key=[fibquant:b=2,k=4,kb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[7],heads=[0],key=[fibquant:b=2,k=4,kb=2.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[7],heads=[1],key=[fibquant:b=2,k=4,kb=3,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[8],heads=[1],value=[fibquant:b=2,k=4,kb=3.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[10],heads=[0],key=[fibquant:b=2,k=4,kb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[11],heads=[2],key=[fibquant:b=2,k=4,kb=3,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[12],heads=[0],key=[fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[13],heads=[1],key=[fibquant:b=2,k=4,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[13],heads=[2],value=[fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[14],heads=[0],key=[fibquant:b=2,k=4,kb=3,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[14],heads=[2],key=[fibquant:b=2,k=4,kb=2.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[15,28],heads=[0],value=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[15],heads=[2],key=[fibquant:b=2,k=4,kb=3.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[16],heads=[1],key=[fibquant:b=2,k=4,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[16],heads=[2],key=[fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[17],heads=[0],key=[fibquant:b=2,k=4,kb=3,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[17],heads=[2],key=[fibquant:b=2,k=4,kb=2.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[18,22],heads=[0],value=[fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[18],heads=[2],key=[fibquant:b=2,k=4,kb=3.5,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[19],heads=[2],key=[fibquant:b=2,k=4,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=2.5,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[21],heads=[0],key=[fibquant:b=2,k=4,kb=2.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[23],heads=[1],key=[fibquant:b=2,k=4,kb=2.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[23],heads=[2],value=[fibquant:b=2,k=4,kb=3.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[24],heads=[0],key=[fibquant:b=2,k=4,kb=3.5,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[24],heads=[1],value=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[25],heads=[0],value=[fibquant:b=2,k=4,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[26],heads=[0],key=[fibquant:b=2,k=4,kb=2.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[26],heads=[2],key=[fibquant:b=2,k=4,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[27],heads=[2],key=[fibquant:b=2,k=4,kb=1.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[28],heads=[1],key=[fibquant:b=2,k=4,kb=1.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=2.5,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[29],heads=[0],key=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[29],heads=[2],value=[fibquant:b=2,k=4,kb=3,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+fibquant:b=2,k=4,kb=3.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8"

# allocated again with key curves measured with 4 directions apart (head files key-pca-1.5..3.5:
# fibquant b=1.25..3.25 + pca=4,pcabits=4, docs/results/head-sensitivity-smollm2-key-pca-*.json),
# values as for C595, at 6.10x (the extra codebooks of the quarter-bit key rates cost ~2%);
# written with white=4 for keys_apart to turn into kb - 0.25 and pca=4,pcabits=4
P610 = "layers:at=[0],codec=[fibquant:b=2,k=4,kb=1,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[1,16,22,25],codec=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[2,5,9],codec=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[4],codec=[fibquant:b=2,k=4,kb=3,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[6,10,18],codec=[fibquant:b=2,k=4,kb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[8],codec=[fibquant:b=2,k=4,kb=3.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[11,27],codec=[fibquant:b=2,k=4,kb=1.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[12],codec=[fibquant:b=2,k=4,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[13],codec=[fibquant:b=2,k=4,kb=2.5,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[15,26],codec=[fibquant:b=2,k=4,kb=3,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[17],codec=[fibquant:b=2,k=4,kb=3,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[19,28],codec=[fibquant:b=2,k=4,kb=2.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[21],codec=[fibquant:b=2,k=4,kb=3,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[23,24],codec=[fibquant:b=2,k=4,kb=3.5,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[29],codec=[fibquant:b=2,k=4,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[0],heads=[2],value=[fibquant:b=2,k=4,kb=1,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[1,2,16],heads=[0],key=[fibquant:b=2,k=4,kb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[1],heads=[1],value=[fibquant:b=2,k=4,kb=2.5,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[1,2],heads=[2],key=[fibquant:b=2,k=4,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[2],heads=[1],value=[fibquant:b=2,k=4,kb=3,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[3],heads=[0],value=[fibquant:b=2,k=4,kb=3.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[4],heads=[0],key=[fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[5,17],heads=[0],value=[fibquant:b=2,k=4,kb=3,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[5],heads=[2],key=[fibquant:b=2,k=4,kb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[6],heads=[0],key=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[7],heads=[0],key=[fibquant:b=2,k=4,kb=2.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[7,20,23],heads=[2],value=[fibquant:b=2,k=4,kb=3.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[9],heads=[0],key=[fibquant:b=2,k=4,kb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[10],heads=[0],value=[fibquant:b=2,k=4,kb=3.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[10],heads=[1],key=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[10],heads=[2],key=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[11],heads=[0],key=[fibquant:b=2,k=4,kb=1,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[11],heads=[1],value=[fibquant:b=2,k=4,kb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[12],heads=[0],key=[fibquant:b=2,k=4,kb=1.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[13],heads=[0],key=[fibquant:b=2,k=4,kb=1.5,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[13],heads=[2],key=[fibquant:b=2,k=4,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[14,20],heads=[0],key=[fibquant:b=2,k=4,kb=3,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[14],heads=[1],value=[fibquant:b=2,k=4,kb=3.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[14],heads=[2],key=[fibquant:b=2,k=4,kb=2.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[15],heads=[0],key=[fibquant:b=2,k=4,kb=1,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[15],heads=[1],key=[fibquant:b=2,k=4,kb=2.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[16,22],heads=[2],value=[fibquant:b=2,k=4,kb=2.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[17],heads=[1],key=[fibquant:b=2,k=4,kb=3.5,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[17],heads=[2],value=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[18],heads=[0],key=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[18,22],heads=[1],key=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[18],heads=[2],value=[fibquant:b=2,k=4,kb=3.5,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[19],heads=[1],key=[fibquant:b=2,k=4,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[19],heads=[2],key=[fibquant:b=2,k=4,kb=1.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[21],heads=[0],key=[fibquant:b=2,k=4,kb=2.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[23],heads=[1],key=[fibquant:b=2,k=4,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[24],heads=[0],value=[fibquant:b=2,k=4,kb=3.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[24],heads=[1],value=[fibquant:b=2,k=4,kb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[24],heads=[2],key=[fibquant:b=2,k=4,kb=3,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[25],heads=[1],key=[fibquant:b=2,k=4,kb=1,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[25],heads=[2],key=[fibquant:b=2,k=4,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=2.5,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[26],heads=[0],value=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[26],heads=[2],key=[fibquant:b=2,k=4,kb=2.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=3,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[27],heads=[2],key=[fibquant:b=2,k=4,kb=1,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[28],heads=[0],value=[fibquant:b=2,k=4,kb=2.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[28],heads=[1],key=[fibquant:b=2,k=4,kb=1.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[29],heads=[0],key=[fibquant:b=2,k=4,kb=1,sinks=1,window=16,prerope=1,white=4,normbits=8],value=[fibquant:b=2,k=4,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+fibquant:b=2,k=4,kb=3.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8"


def keys_apart(plan: str, rank: int, bits: int) -> str:
    """``plan`` with every FibQuant tier's keys coded with their top ``rank`` directions apart
    (``pca=``, :mod:`kvshrink.codecs.primitives.principal`) instead of fitted to the queries
    (``white=4``), paid for by a key rate 0.25 bit lower (``rank·bits`` = 16 bits a token at
    d = 64, the same bytes as the 0.25 bit); values and heavy tokens unchanged."""

    def one(m: re.Match) -> str:
        b, kb = float(m.group(1)), m.group(3)
        rate = (float(kb) if kb else b) - 0.25
        return f"fibquant:b={m.group(1)},k={m.group(2)},kb={rate:g},"

    out = re.sub(r"fibquant:b=([\d.]+),k=(\d+),(?:kb=([\d.]+),)?", one, plan)
    return out.replace("white=4", f"pca={rank},pcabits={bits}")


TARGETS = {
    "turboquant b=2": "turboquant:b=2",
    "fibquant b=2 k=4": "fibquant:b=2,k=4",
    # the same rate with larger blocks: k=6 pads d=64 to 66 (11 blocks, 4096 codewords), k=8 holds
    # 65536 codewords (2 MiB of fp32 codebook, counted once per cache: 5.4x at 2048 tokens)
    "fibquant b=2 k=6": "fibquant:b=2,k=6,pad=1",
    "fibquant b=2 k=8": "fibquant:b=2,k=8",
    # per-layer rates from the sensitivity study (benchmarks/layer_sensitivity.py,
    # docs/results/layer-allocation-smollm2.md), and the best one-rate configs beside them
    "best at ~7x": "layers:at=[0],codec=[fibquant:b=2,k=4,kb=1.5,vb=2.5,sinks=1,prerope=1]+layers:at=[1],codec=[fibquant:b=2,k=4,vb=3,sinks=1,prerope=1]+layers:at=[2,4,5,12,14,22,27],codec=[fibquant:b=2,k=4,kb=2.5,vb=1,sinks=1,prerope=1]+layers:at=[3,15,17-20,23],codec=[fibquant:b=2,k=4,kb=3,vb=1.5,sinks=1,prerope=1]+layers:at=[6],codec=[fibquant:b=2,k=4,vb=1,sinks=1,prerope=1]+layers:at=[7],codec=[fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,prerope=1]+layers:at=[8],codec=[fibquant:b=2,k=4,kb=2.5,sinks=1,prerope=1]+layers:at=[24],codec=[fibquant:b=2,k=4,kb=3,sinks=1,prerope=1]+layers:at=[28],codec=[fibquant:b=2,k=4,vb=1.5,sinks=1,prerope=1]+layers:at=[29],codec=[fibquant:b=2,k=4,kb=1.5,vb=1,sinks=1,prerope=1]+fibquant:b=2,k=4,kb=3,vb=1,sinks=1,prerope=1",
    "best at >=5.5x": "layers:at=[0],codec=[fibquant:b=2,k=4,kb=2.5,vb=3,sinks=1,window=16,prerope=1]+layers:at=[1],codec=[fibquant:b=2,k=4,kb=3,vb=3,sinks=1,window=16,prerope=1]+layers:at=[4,9,11-13,16,22,25,27],codec=[fibquant:b=2,k=4,kb=3,vb=1.5,sinks=1,window=16,prerope=1]+layers:at=[7,8,17-20,23,24],codec=[fibquant:b=2,k=4,kb=3,vb=2.5,sinks=1,window=16,prerope=1]+layers:at=[28],codec=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1]+layers:at=[29],codec=[fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,window=16,prerope=1]+fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1",
    # the same allocation with keys coded through the transform fitted to the prompt's queries
    # (white=4; key sensitivities re-measured with it, benchmarks/layer_sensitivity.py --roles key)
    "best at ~7x, keys fitted to queries": "layers:at=[0],codec=[fibquant:b=2,k=4,vb=3,sinks=1,window=16,prerope=1,white=4]+layers:at=[1],codec=[fibquant:b=2,k=4,kb=2.5,vb=3,sinks=1,window=16,prerope=1,white=4]+layers:at=[2,6,17],codec=[fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,window=16,prerope=1,white=4]+layers:at=[4,9,11],codec=[fibquant:b=2,k=4,kb=2.5,vb=1,sinks=1,window=16,prerope=1,white=4]+layers:at=[7,10],codec=[fibquant:b=2,k=4,kb=3,vb=1.5,sinks=1,window=16,prerope=1,white=4]+layers:at=[8,18],codec=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4]+layers:at=[12,13,16],codec=[fibquant:b=2,k=4,vb=1,sinks=1,window=16,prerope=1,white=4]+layers:at=[19],codec=[fibquant:b=2,k=4,sinks=1,window=16,prerope=1,white=4]+layers:at=[20,23,24],codec=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4]+layers:at=[22,25-27,29],codec=[fibquant:b=2,k=4,kb=1.5,vb=1,sinks=1,window=16,prerope=1,white=4]+fibquant:b=2,k=4,vb=1.5,sinks=1,window=16,prerope=1,white=4",
    "best at >=5.5x, keys fitted to queries": "layers:at=[0],codec=[fibquant:b=2,k=4,kb=2.5,vb=3,sinks=1,window=16,prerope=1,white=4]+layers:at=[1,8,23,24],codec=[fibquant:b=2,k=4,kb=3,vb=3,sinks=1,window=16,prerope=1,white=4]+layers:at=[2-6,9,10],codec=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4]+layers:at=[11,12],codec=[fibquant:b=2,k=4,kb=3,vb=1.5,sinks=1,window=16,prerope=1,white=4]+layers:at=[13,16,29],codec=[fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,window=16,prerope=1,white=4]+layers:at=[19,28],codec=[fibquant:b=2,k=4,kb=2.5,vb=2.5,sinks=1,window=16,prerope=1,white=4]+layers:at=[22,26],codec=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4]+layers:at=[25],codec=[fibquant:b=2,k=4,vb=1,sinks=1,window=16,prerope=1,white=4]+layers:at=[27],codec=[fibquant:b=2,k=4,vb=1.5,sinks=1,window=16,prerope=1,white=4]+fibquant:b=2,k=4,kb=3,vb=2.5,sinks=1,window=16,prerope=1,white=4",
    # the same with norms as 8-bit log codes (normbits=8: 0.125 bit per coordinate back to the
    # codes) and key rates up to 3.5 bits (sensitivities at 3.5 bits measured, KL curves through
    # every measured rate; allocated at 5.79x, since the 3.5-bit codebook's 256 KB is counted)
    "best at >=5.5x, log-coded norms": "layers:at=[0],codec=[fibquant:b=2,k=4,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[1],codec=[fibquant:b=2,k=4,kb=2.5,vb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[2,9,14,21,26],codec=[fibquant:b=2,k=4,kb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[3,5,6,10],codec=[fibquant:b=2,k=4,kb=3.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[4,22,28],codec=[fibquant:b=2,k=4,kb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[8,24],codec=[fibquant:b=2,k=4,kb=3.5,vb=3,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[11-13,16,29],codec=[fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[15,19],codec=[fibquant:b=2,k=4,kb=2.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[25],codec=[fibquant:b=2,k=4,vb=1,sinks=1,window=16,prerope=1,white=4,normbits=8]+layers:at=[27],codec=[fibquant:b=2,k=4,vb=1.5,sinks=1,window=16,prerope=1,white=4,normbits=8]+fibquant:b=2,k=4,kb=3.5,vb=2.5,sinks=1,window=16,prerope=1,white=4,normbits=8",
    # the most-attended tokens held at a higher rate (src/kvshrink/eval/heavy.py): 32 per KV head
    # and layer at FibQuant b=4,k=2 (2% of the bytes), on the same plan allocated at 5.92x so that
    # the total lands at 5.5x; 6-window screen: KL 0.0071 vs 0.0098 for [P5]
    # (docs/results/heavy-tokens-smollm2-*.json)
    "best at >=5.5x, heavy tokens at 4 bits": "heavy:m=32,last=0.75,b=4,k=2+" + P592,
    "best at >=5.5x, heavy tokens exact": "heavy:m=8,last=0.75+" + P592,
    # rates per KV head instead of per layer, same heavy tokens (6-window screens at 5.92x: KL
    # 0.0065 vs 0.0071 with 32 tokens at 4 bits, 0.0068 vs 0.0077 with 8 exact)
    "best at >=5.5x, per-head rates, heavy tokens at 4 bits": "heavy:m=32,last=0.75,b=4,k=2+" + H595,
    "best at >=5.5x, per-head rates, heavy tokens exact": "heavy:m=8,last=0.75+" + H595,
    "best at >=5.5x, per-head curves, heavy tokens at 4 bits": "heavy:m=32,last=0.75,b=4,k=2+" + C595,
    "best at >=5.5x, per-head curves, 24 heavy tokens at 5 bits": "heavy:m=24,last=0.75,b=5,k=2+" + C595,
    # the same plan, keys with their top directions coded apart instead of white=4, at a key rate
    # 0.25 bit lower (same bytes); rates not re-allocated (offline screen, 2 windows: the keys'
    # attention KL -25% to -36% at 2, 3 and 3.5 bits against white=4 at equal bytes)
    "best at >=5.5x, per-head curves, 24 heavy tokens at 5 bits, 4 key directions apart": "heavy:m=24,last=0.75,b=5,k=2+"
    + keys_apart(C595, 4, 4),
    "best at >=5.5x, per-head curves, 24 heavy tokens at 5 bits, 2 key directions apart": "heavy:m=24,last=0.75,b=5,k=2+"
    + keys_apart(C595, 2, 8),
    "best at >=5.5x, key curves with 4 directions apart, 24 heavy tokens at 5 bits": "heavy:m=24,last=0.75,b=5,k=2+"
    + keys_apart(P610, 4, 4),
    "one rate at ~7x": "fibquant:b=2,k=4,kb=2.5,vb=1.5,sinks=1,prerope=1",
    "one rate at >=5.5x": "fibquant:b=2.5,k=4,kb=3,vb=2,sinks=1,window=16,prerope=1",
    # attention cosine >= 0.99 at >= 4x: keys at 4 bits, centred and coded before RoPE (centring
    # raises cosine the most, docs/results/frontier-smollm2-search.md), values at 3 bits
    "cos >= 0.99 at >= 4x": "fibquant:b=4,k=2,kb=4,vb=3,sinks=1,center=1,prerope=1",
    "hf-quanto b=4": "hf-quanto:b=4",
    "hf-quanto b=2": "hf-quanto:b=2",
}


def _with_seed(spec: str, seed: int) -> str:
    return spec if spec.startswith("hf-") else f"{spec},seed={seed}"


def _quanto_without_nvcc() -> None:
    """quanto compiles its CUDA extension with nvcc on first use (minutes); for the cache it only
    needs ``unpack``, whose pure-PyTorch form (same maths) stands in."""
    try:
        from optimum.quanto.library.extensions import cuda as qcuda
    except Exception:
        return

    def py_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
        per = 8 // bits
        parts = [(packed & (2 ** (bits * (i + 1)) - 1)) >> (bits * i) for i in range(per)]
        return torch.cat(parts).to(torch.uint8)

    qcuda.ext._lib = type("PyUnpack", (), {"unpack": staticmethod(py_unpack)})()


def _progress(desc: str):
    def make(total: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)

    return make


def aggregate_targets(rows: list[dict], seeds: int) -> list[dict]:
    """Average each target over its seeds window by window; SE over windows."""
    by_spec = {r["method"]: r for r in rows}
    out = []
    for name, spec in TARGETS.items():
        runs = [by_spec[_with_seed(spec, s)] for s in range(seeds) if _with_seed(spec, s) in by_spec]
        runs = list({id(r): r for r in runs}.values())  # peers: one run, listed once
        if not runs:
            continue
        per_window = [statistics.fmean(ws) for ws in zip(*(r["window_ppl_delta"] for r in runs))]
        n = len(per_window)
        se = statistics.stdev(per_window) / math.sqrt(n) if n > 1 else float("nan")
        seed_means = [r["ppl_delta"] for r in runs]
        out.append(
            {
                "target": name,
                "method": spec,
                "seeds": len(runs),
                "windows": n,
                "compression_ratio": statistics.fmean(r["compression_ratio"] for r in runs),
                "bits_per_element": statistics.fmean(r["bits_per_element"] for r in runs),
                "attn_cosine": statistics.fmean(r["attn_cosine"] for r in runs),
                "ppl_delta": statistics.fmean(per_window),
                "ppl_delta_se": se,
                "ppl_delta_seed_sd": statistics.stdev(seed_means) if len(seed_means) > 1 else 0.0,
                "kl": statistics.fmean(r["kl"] for r in runs),
                "kl_se": statistics.fmean(r["kl_se"] for r in runs) / math.sqrt(len(runs)),
                "device": runs[0].get("device", ""),
            }
        )
    return out


def targets_markdown(agg: list[dict], base_ppl: float, cfg: FrontierConfig, seeds: int) -> str:
    lines = [
        "## Target rows",
        "",
        f"{cfg.windows} windows x {seeds} rotation seeds, context {cfg.context}; baseline perplexity "
        f"{base_ppl:.3f}. Δppl: mean over windows of the seed-averaged delta, ± standard error over windows; "
        "seed sd: spread of the per-seed means.",
        "",
        "| target | method | ratio | attn cos | Δppl ± se | seed sd | KL |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    long: list[tuple[str, str]] = []  # per-layer plans run to ~800 characters: listed below the table
    for r in agg:
        target, method = r["target"], f"`{r['method']}`"
        if len(r["method"]) > 120:
            ref = f"[P{len(long) + 1}]"
            long.append((ref, r["method"]))
            method = ref
            target = target if not target.startswith("candidate ") else f"candidate {ref}"
        lines.append(
            f"| {target} | {method} | {r['compression_ratio']:.2f}x | {r['attn_cosine']:.4f} | "
            f"{r['ppl_delta']:+.3f} ± {r['ppl_delta_se']:.3f} | {r['ppl_delta_seed_sd']:.3f} | {r['kl']:.4f} |"
        )
    devices = {r.get("device", "") for r in agg}
    if len(devices) > 1:  # rows added with --only on another machine: same windows and seeds, fp32 both
        lines += [""] + [
            f"Measured on {dev}: " + ", ".join(r["target"] for r in agg if r.get("device", "") == dev) + "."
            for dev in sorted(devices)
        ]
    if long:
        lines += [
            "",
            "Per-layer plans (`layers:at=[..],codec=[..]+BASE`, from `benchmarks/layer_sensitivity.py`):",
            "",
        ]
        lines += [f"- {ref}: `{spec}`" for ref, spec in long]
    return "\n".join(lines) + "\n"


def render(out: Path, stem: str) -> int:
    data = json.loads((out / f"{stem}.json").read_text())
    md = frontier_markdown(data, "FibQuant frontier on SmolLM2-135M") if "rows" in data else ""
    if "targets" in data:
        t = data["targets"]
        md += "\n" + targets_markdown(
            t["rows"], t["baseline_ppl"], FrontierConfig(data.get("context", 2048), t["windows"]), t["seeds"]
        )
    atomic_write(out / f"{stem}.md", md)
    if "rows" in data:
        plot_frontier(
            data,
            out / f"{stem}.png",
            family,
            "SmolLM2-135M KV cache: FibQuant vs TurboQuant, KIVI, int, quanto",
        )
    print(md)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--frontier-windows", type=int, default=4)
    ap.add_argument("--target-windows", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--phase", choices=["frontier", "targets", "both"], default="both")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny run (context 256, 2 windows) to check the script"
    )
    ap.add_argument("--model", default="smollm2-135m", help="embedded name or .gguf path (same weights)")
    ap.add_argument(
        "--ids", default=None, help=".npy of the essays' token ids (for machines without the text)"
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way)")
    ap.add_argument("--dump-ids", default=None, help="write the essays' token ids to this .npy and exit")
    ap.add_argument("--render", action="store_true", help="only re-render md/png from the JSON in --out")
    ap.add_argument("--candidates", default="", help='extra target rows, "spec;spec" or @file (one per line)')
    ap.add_argument(
        "--only",
        default="",
        help='targets phase: run only these target names ("name;name"), keeping the other rows of the JSON in --out',
    )
    args = ap.parse_args()
    if args.smoke:
        args.context, args.frontier_windows, args.target_windows, args.seeds = 256, 2, 2, 2
    out = Path(args.out)
    torch.manual_seed(0)
    t0 = time.time()
    if args.render:
        return render(Path(args.out), "frontier-smollm2")
    if args.dump_ids:
        import numpy as np

        _, tok = load_model(args.model)
        np.save(
            args.dump_ids, np.asarray(tok(load_text(), add_special_tokens=False).input_ids, dtype=np.int32)
        )
        return 0
    model, tok = load_model(args.model)
    model.to(args.device)
    if args.device.startswith("cuda"):
        _quanto_without_nvcc()
    if args.ids:
        import numpy as np

        ids = torch.from_numpy(np.load(args.ids).astype(np.int64))
    else:
        ids = torch.tensor(tok(load_text(), add_special_tokens=False).input_ids, dtype=torch.long)
    stem = "frontier-smollm2" + ("-smoke" if args.smoke else "")
    here = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    data = {"device": here}
    prev = out / f"{stem}.json"
    if prev.exists() and args.phase != "both":
        # --only adds rows to a table measured elsewhere: the table keeps its device, each run says its own
        data = {**json.loads(prev.read_text())} | ({} if args.only else data)

    def write() -> str:
        data["seconds"] = time.time() - t0
        md = frontier_markdown(data, "FibQuant frontier on SmolLM2-135M") if "rows" in data else ""
        if "targets" in data:
            t = data["targets"]
            cfg_t = FrontierConfig(args.context, t["windows"])
            md += "\n" + targets_markdown(t["rows"], t["baseline_ppl"], cfg_t, t["seeds"])
        write_json(out / f"{stem}.json", data)
        atomic_write(out / f"{stem}.md", md)
        if "rows" in data:
            title = "SmolLM2-135M KV cache: FibQuant vs TurboQuant, KIVI, int, quanto"
            try:
                plot_frontier(data, out / f"{stem}.png", family, title)
            except ImportError:  # a GPU host without matplotlib: re-render from the JSON (--render)
                pass
        return md

    cands = args.candidates
    if cands.startswith("@"):  # a file, one spec per line ('#' comments): long per-layer specs
        lines = Path(cands[1:]).read_text().splitlines()
        cands = ";".join(x for x in lines if x.strip() and not x.lstrip().startswith("#"))
    for spec in filter(None, (x.strip() for x in cands.split(";"))):
        TARGETS[f"candidate {spec}"] = spec
    # targets first: they carry the issue's claims; each phase is written as soon as it ends
    if args.phase in ("targets", "both"):
        cfg = FrontierConfig(context=args.context, windows=args.target_windows)
        todo = list(dict.fromkeys(TARGETS.values()))
        runs: list[dict] = []
        if args.only:
            names = [x.strip() for x in args.only.split(";") if x.strip()]
            unknown = [n for n in names if n not in TARGETS]
            if unknown:
                raise SystemExit(f"--only: unknown target {unknown[0]!r} (valid: {', '.join(TARGETS)})")
            old = data.get("targets", {})
            if old and (old.get("windows"), old.get("seeds")) != (cfg.windows, args.seeds):
                raise SystemExit(
                    f"--only: the JSON's targets used {old.get('windows')} windows x {old.get('seeds')} seeds; "
                    f"pass --target-windows {old.get('windows')} --seeds {old.get('seeds')}"
                )
            todo = list(dict.fromkeys(TARGETS[n] for n in names))
            mine = {_with_seed(spec, k) for spec in todo for k in range(args.seeds)}
            runs = [r for r in old.get("runs", []) if r["method"] not in mine]
        table_device = data["device"]
        for r in runs:
            r.setdefault("device", table_device)
        # one target (all its seeds) at a time, written after each: a run cut short by a time
        # limit keeps what it finished (captures repeat per group; cheap next to the methods)
        for spec in todo:
            specs = list(dict.fromkeys(_with_seed(spec, k) for k in range(args.seeds)))
            res = run_frontier(model, ids, specs, cfg, "smollm2-135m", progress=_progress(spec)).to_json()
            runs += [{**r, "device": here} for r in res["rows"]]
            base = res["baseline_ppl"]
            if args.only and "baseline_ppl" in data.get("targets", {}):
                print(f"baseline ppl here {base:.4f}, in the table {data['targets']['baseline_ppl']:.4f}")
                base = data["targets"]["baseline_ppl"]
            # rows of earlier --candidates runs are not in TARGETS now: kept as they were
            earlier = [r for r in data.get("targets", {}).get("rows", []) if r["target"] not in TARGETS]
            data["targets"] = {
                "windows": cfg.windows,
                "seeds": args.seeds,
                "baseline_ppl": base,
                "rows": aggregate_targets(runs, args.seeds) + earlier,
                "runs": runs,
            }
            write()
    if args.phase in ("frontier", "both"):
        cfg = FrontierConfig(context=args.context, windows=args.frontier_windows)
        res = run_frontier(
            model, ids, FRONTIER, cfg, "smollm2-135m", progress=_progress("frontier")
        ).to_json()
        data.update(res)
    print(write())
    return 0


if __name__ == "__main__":
    from kvshrink.cli.common import run_cli

    sys.exit(run_cli(main))
