"""Plan rewrites of ``benchmarks/frontier_smollm2.py``: a target row measures what its name says."""

from __future__ import annotations

import torch

from kvshrink.codecs import make_codec


def test_keys_apart_trades_a_quarter_bit_of_key_rate_for_directions(bench_module) -> None:
    f = bench_module("frontier_smollm2")
    plan = (
        "layers:at=[0],codec=[fibquant:b=2,k=4,kb=3.5,vb=1.5,sinks=1,white=4,normbits=8]"
        "+layers:at=[1],heads=[2],value=[fibquant:b=2,k=4,vb=3,white=4]"
        "+fibquant:b=2,k=4,sinks=1,white=4"
    )
    out = f.keys_apart(plan, 4, 4)
    assert "white" not in out
    specs = [s.split("]")[0] for s in out.replace("codec=[", "|").replace("value=[", "|").split("|")[1:]]
    specs.append(out.rsplit("+", 1)[1])
    rates = []
    for spec in specs:
        cfg = make_codec(spec).config
        assert (cfg.pca, cfg.pcabits) == (4, 4)
        rates.append(cfg.kb if cfg.kb is not None else cfg.b)
    assert rates == [3.25, 1.75, 1.75]  # 3.5 - 0.25, then b=2 (no kb given) - 0.25 twice
    # the values keep their rates
    assert make_codec(specs[0]).config.vb == 1.5 and make_codec(specs[1]).config.vb == 3
    # 4 directions at 4 bits are 16 bits a token, the 0.25 bit the keys gave up at d=64: the
    # rewritten codec holds the same bytes up to the stored basis (4·64 + 4 fp16 per head)
    x = torch.randn(1, 3, 512, 64, generator=torch.Generator().manual_seed(0))
    before = make_codec("fibquant:b=2,k=4,kb=3.5,normbits=8").encode(x, "key").nbytes()
    after = (
        make_codec(f.keys_apart("fibquant:b=2,k=4,kb=3.5,white=4,normbits=8", 4, 4)).encode(x, "key").nbytes()
    )
    assert after - before == 3 * (4 * 64 + 4) * 2
