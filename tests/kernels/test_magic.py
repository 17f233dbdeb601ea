"""The PTX of ``magic.py``: run by a small emulator of its four instructions on every layout, and
compiled for sm_90 with Triton's own ptxas (the GPU runs it in the CUDA tests)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvshrink.kernels.decode_attn.magic import PACK, lut_asm, table_words, unpack_asm

ROOT = Path(__file__).resolve().parents[2]


def _f16x2(x: int) -> np.ndarray:
    return np.array([x & 0xFFFF, x >> 16], dtype=np.uint16).view(np.float16)


def _emulate(asm: str, inputs: list[int], n_out: int) -> list[int]:
    """Registers after running ``asm``: mov, and, shr, prmt (default mode), lop3 with LUT 0xEA,
    fma.rn.f16x2."""
    reg: dict[str, int] = {f"${n_out + i}": v for i, v in enumerate(inputs)}

    def val(x: str) -> int:
        return int(x, 16) if x.startswith("0x") else int(x) if x.isdigit() else reg[x]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        a = [x.strip() for x in args.split(",")]
        if op == "mov.b32":
            reg[a[0]] = val(a[1])
        elif op == "and.b32":
            reg[a[0]] = val(a[1]) & val(a[2])
        elif op == "shr.b32":
            reg[a[0]] = val(a[1]) >> val(a[2])
        elif op == "prmt.b32":
            src = val(a[1]) | val(a[2]) << 32
            sel = val(a[3])
            out = 0
            for k in range(4):
                s = sel >> (4 * k) & 0xF
                assert s < 8, "sign-replicate mode is never used"
                out |= (src >> (8 * s) & 0xFF) << (8 * k)
            reg[a[0]] = out
        elif op == "lop3.b32":
            assert a[4] == "0xEA"
            reg[a[0]] = (val(a[1]) & val(a[2])) | val(a[3])
        elif op == "fma.rn.f16x2":
            x, m, c = (_f16x2(val(r)).astype(np.float64) for r in a[1:])
            h = (x * m + c).astype(np.float16).view(np.uint16).astype(np.int64)  # one rounding, as fma
            reg[a[0]] = int(h[0]) | int(h[1]) << 16
        else:
            raise AssertionError(f"unexpected instruction {op}")
    return [reg[f"${i}"] for i in range(n_out)]


@pytest.mark.parametrize("wb", sorted(PACK))
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_unpack_asm_gives_every_index_as_fp16(wb: int, bits: int) -> None:
    rng = np.random.default_rng(wb * 10 + bits)
    pack = PACK[wb]
    zero = (1 << (bits - 1)) - 1  # the symmetric absmax zero point; 0 for 1 bit
    for r in range(wb * 8 // bits):
        asm, cons = unpack_asm(wb, bits, r, zero)
        n_out = cons.count("=")
        assert n_out == pack // 2 and cons.count(",") + 1 == n_out + pack * wb // 4
        for _ in range(20):
            words = rng.integers(0, 1 << (8 * wb), size=pack, dtype=np.uint64)
            raw = b"".join(int(w).to_bytes(wb, "little") for w in words)
            regs = [int.from_bytes(raw[i : i + 4], "little") for i in range(0, len(raw), 4)]
            got = np.concatenate([_f16x2(x) for x in _emulate(asm, regs, n_out)])
            want = (words >> np.uint64(r * bits)) & np.uint64((1 << bits) - 1)
            want = want.astype(np.float64) - zero
            assert np.array_equal(got.astype(np.float64), want), (wb, bits, r, words)


@pytest.mark.parametrize(("wb", "bits"), [(1, 4), (2, 4), (4, 4), (1, 2), (2, 2)])
def test_lut_asm_gives_every_codeword_of_every_index(wb: int, bits: int) -> None:
    rng = np.random.default_rng(wb)
    book = np.sort(rng.standard_normal(1 << bits)).astype(np.float16)
    patterns = [int(x) for x in book.view(np.uint16)]
    asm, cons, n_out = lut_asm(wb, bits, patterns)
    pack, per = PACK[wb], wb * 8 // bits
    tables = [t for t in table_words(patterns) for _ in range(pack)]  # a broadcast scalar: pack registers
    assert n_out == per * pack // 2 and cons.count(",") + 1 == n_out + pack * wb // 4 + len(tables)
    for _ in range(50):
        words = rng.integers(0, 1 << (8 * wb), size=pack, dtype=np.uint64)
        raw = b"".join(int(w).to_bytes(wb, "little") for w in words)
        regs = [int.from_bytes(raw[i : i + 4], "little") for i in range(0, len(raw), 4)]
        got = np.concatenate([_f16x2(x) for x in _emulate(asm, regs + tables, n_out)]).reshape(per, pack)
        for r in range(per):
            idx = ((words >> np.uint64(bits * r)) & np.uint64((1 << bits) - 1)).astype(np.int64)
            assert np.array_equal(got[r].view(np.uint16), book[idx].view(np.uint16)), (wb, r, words)


def test_unpack_asm_rejects_layouts_it_cannot_do() -> None:
    for args in ((3, 3, 0), (1, 3, 0), (1, 4, 2), (4, 4, 8)):
        with pytest.raises(ValueError, match="no fp16 unpack"):
            unpack_asm(*args)
    with pytest.raises(ValueError, match="zero point 16"):
        unpack_asm(1, 4, 0, 16)


def test_kernel_constraints_match_the_generator() -> None:
    """The sub-stream kernel spells constraints and pack per word width; they must be these."""
    src = (ROOT / "src/kvshrink/kernels/decode_attn/kernel_sub.py").read_text()
    spelled = re.findall(r'MAGIC\[r\], "([^"]+)", \[words\], dtype=tl.float16, is_pure=\w+, pack=(\d)', src)
    want = [(unpack_asm(wb, 4, 0)[1], str(PACK[wb])) for wb in (1, 2, 4)]  # bitwidth 8, 16, else
    assert spelled == want


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_magic_path_compiles_for_sm90_without_int_to_float_converts() -> None:
    """Triton's ptxas accepts the PTX; the hot loop of int4/int8 has no I2F left, and TurboQuant
    b=4 no codebook loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(ROOT / "src")}
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks/kernel_sass.py"),
        "int4",
        "int8",
        "turboquant:b=2",
        "turboquant:b=4",
        "--json",
    ]
    res = {}
    for magic in (True, False):
        out = subprocess.run(
            [*cmd, "--config", json.dumps({"magic": magic, "sub": True})],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr:
            pytest.skip("triton has no bundled ptxas here")
        assert out.returncode == 0, out.stderr[-2000:]
        res[magic] = json.loads(out.stdout)
    for row_on, row_off in zip(res[True], res[False], strict=True):
        assert row_on["kernel"] == "_split_sub_kernel"
        assert row_on["loop"] < row_off["loop"], (row_on["loop"], row_off["loop"])
        if row_on["method"].startswith("int"):
            assert row_on["loop_mix"].get("I2F", 0) == 0, row_on
            assert row_off["loop_mix"].get("I2F", 0) > 0, row_off  # the plain path converts
        else:  # codewords by permutes, not by a load per element from an L1 table
            assert row_on["loop_mix"].get("LDG", 0) < row_off["loop_mix"].get("LDG", 0) // 4, (
                row_on,
                row_off,
            )


if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    from kvshrink.kernels.decode_attn.kernel_sub import _table_words

    @triton.jit
    def _tables(cb_ptr, out_ptr, N: tl.constexpr):
        tabs = _table_words(cb_ptr, N)
        tl.store(out_ptr, tabs[0])
        tl.store(out_ptr + 1, tabs[1])
        if N == 16:
            tl.store(out_ptr + 2, tabs[2])
            tl.store(out_ptr + 3, tabs[3])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("n", [4, 16])
def test_kernel_table_words_match_the_generator(n: int) -> None:
    """The kernel computes the asm's table inputs from the fp16 codebook (``_table_words``); they
    must be ``magic.table_words`` of the same bit patterns (run here in the interpreter)."""
    import torch

    book = torch.sort(torch.randn(n, generator=torch.Generator().manual_seed(n))).values.half()
    book[0] = -book[0].abs()  # a negative codeword: the high byte's sign bit reaches bit 31
    out = torch.zeros(4, dtype=torch.int32)
    _tables[(1,)](book, out, n)
    patterns = [int(x) & 0xFFFF for x in book.view(torch.int16).tolist()]
    want = [w - (1 << 32) if w >= 1 << 31 else w for w in table_words(patterns)]  # as int32
    assert out[: len(want)].tolist() == want
