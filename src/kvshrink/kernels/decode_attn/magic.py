"""PTX that turns packed integer codes into fp16 two at a time, without an int-to-float convert.

Why: on an H100 the sub-stream kernel spent one ``I2F`` per dequantized element, and conversions
issue at a quarter of the integer rate; with the shifts, masks and byte moves around them the
kernel ran at ~25% of its byte floor. The classic trick (FasterTransformer, Marlin): OR a code
``c < 1024`` into the mantissa of fp16 ``1024`` (bits ``0x6400``) and the half *is* ``1024 + c``.
One ``prmt`` puts the bytes holding index ``r`` of two words into the two halves of a register,
one ``lop3`` masks index ``r`` and ORs the exponent in, and one ``fma.rn.f16x2`` removes the
1024 and the ``2^off`` of a code that sits ``off`` bits up its byte: two codes per three
instructions, all exact (``2^off · c + 1024 < 2048`` is an integer in fp16's 11-bit mantissa).

These strings go to ``tl.inline_asm_elementwise`` (CUDA only: the interpreter cannot run PTX, so
the kernel keeps its plain shift, mask and convert beside it; the two are compared on the device,
and the asm by an emulator of its instructions in CI, ``tests/kernels/test_magic.py``). Input elements of ``wb`` bytes are packed ``4/wb`` to a 32-bit register by Triton:
``pack`` elements per asm instance, element ``j`` in byte ``j·wb`` of the concatenated inputs.
"""

from __future__ import annotations

import struct

__all__ = ["PACK", "lut_asm", "table_words", "unpack_asm"]

PACK = {1: 4, 2: 2, 4: 2}  # elements per asm instance, by word bytes


def _half(x: float) -> int:
    return struct.unpack("<H", struct.pack("<e", x))[0]


def unpack_asm(wb: int, bits: int, r: int, zero: int = 0) -> tuple[str, str]:
    """(asm, constraints) that map ``pack`` words of ``wb`` bytes to the fp16 values
    ``code - zero`` of index ``r`` (the zero point rides in the same ``fma``, exactly).

    Index ``r`` of a word sits at bits ``[r·bits, (r+1)·bits)`` (little-endian words, as
    ``bitpack.pack_rows`` writes them)."""
    if wb not in PACK or bits not in (1, 2, 4, 8) or not 0 <= r < wb * 8 // bits:
        raise ValueError(f"no fp16 unpack for {wb}-byte words of {bits}-bit indices, index {r}")
    if not 0 <= zero < 1 << bits:
        raise ValueError(f"zero point {zero} is not a {bits}-bit code")
    pack = PACK[wb]
    n_in = pack * wb // 4  # input registers
    n_out = pack // 2  # output registers (two halves each)
    byte, off = divmod(r * bits, 8)
    mask = ((1 << bits) - 1) << off
    mul = _half(2.0**-off)
    add = _half(-1024.0 * 2.0**-off - zero)  # an integer <= 1279 in magnitude: exact in fp16
    src = [f"${n_out + i}" for i in range(n_in)]
    a, b = (src[0], src[1]) if n_in == 2 else (src[0], src[0])
    lines = [
        "{",
        ".reg .b32 t, m, c;",
        f"mov.b32 m, {mul | mul << 16:#010x};",
        f"mov.b32 c, {add | add << 16:#010x};",
    ]
    for k in range(n_out):
        e0, e1 = 2 * k, 2 * k + 1
        s0, s1 = e0 * wb + byte, e1 * wb + byte
        sel = s0 | (s0 << 4) | (s1 << 8) | (s1 << 12)
        lines.append(f"prmt.b32 t, {a}, {b}, {sel:#06x};")
        lines.append(f"lop3.b32 t, t, {mask | mask << 16:#010x}, 0x64006400, 0xEA;")
        lines.append(f"fma.rn.f16x2 ${k}, t, m, c;")
    lines.append("}")
    constraints = ",".join(["=r"] * n_out + ["r"] * n_in)
    return "\n".join(lines), constraints


# -- codebook lookups by byte permutes ------------------------------------------------------------
#
# A scalar rotation codec (TurboQuant) stores indices into an N-level fp16 codebook. ``prmt``
# picks 4 bytes out of 8 by 4 selector nibbles, so a register pair holds a table of 8 bytes: the
# low bytes of codewords 0..7 in one pair, their high bytes in another, codewords 8..15 in two
# more. A 4-bit index is itself a selector nibble; its top bit picks the pair (a third ``prmt``
# merges the two candidates by selector ``k + 4·bit3``). Eight indices of one 32-bit register
# cost 17 instructions this way, and the halves are then interleaved into fp16 pairs of one
# sub-stream; the table bytes are immediates, so the kernel is specialized per codebook.


def _lut16_bytes(src: str, tl: list[int], th: list[int], tag: str) -> tuple[list[str], list[str]]:
    """PTX computing ``{tag}l0/{tag}h0`` (low/high bytes of the codewords of nibbles 0..3 of
    ``src``) and ``{tag}l1/{tag}h1`` (nibbles 4..7)."""
    regs = [f"{tag}s", f"{tag}m", f"{tag}x", f"{tag}y"] + [f"{tag}{p}{i}" for p in "lh" for i in "01"]
    out = [
        f"and.b32 {tag}s, {src}, 0x77777777;",
        f"shr.b32 {tag}m, {src}, 1;",
        f"lop3.b32 {tag}m, {tag}m, 0x44444444, 0x32103210, 0xEA;",
    ]
    for half in (0, 1):
        if half:
            out += [f"shr.b32 {tag}s, {tag}s, 16;", f"shr.b32 {tag}m, {tag}m, 16;"]
        for plane, table in (("l", tl), ("h", th)):
            out += [
                f"prmt.b32 {tag}x, $T{plane}0, {table[1]:#010x}, {tag}s;",
                f"prmt.b32 {tag}y, $T{plane}2, {table[3]:#010x}, {tag}s;",
                f"prmt.b32 {tag}{plane}{half}, {tag}x, {tag}y, {tag}m;",
            ]
    return regs, out


def _words(values: list[int]) -> list[int]:
    """Little-endian 32-bit words of a byte list."""
    return [int.from_bytes(bytes(values[i : i + 4]), "little") for i in range(0, len(values), 4)]


def _lut4_asm(wb: int, codebook: list[int]) -> tuple[list[str], list[str]]:
    """Declarations and body for 2-bit indices (4 codewords): one register of low bytes ``TL``,
    one of high bytes ``TH``; a nibble ``n < 4`` selects from the first operand, so
    ``prmt(TL, TH, x)`` and ``prmt(TH, TL, x)`` give the low and high bytes of 4 codewords. Even
    and odd indices are spread into nibbles by one mask each (``x0``, ``x1``)."""
    tl, th = _words([c & 0xFF for c in codebook])[0], _words([c >> 8 for c in codebook])[0]
    decl = ["x0", "x1", "ua", "ub"] + [f"{p}{q}{h}" for p in "lh" for q in "01" for h in "ab"]
    body = [
        "and.b32 x0, $IN, 0x33333333;",
        "shr.b32 x1, $IN, 2;",
        "and.b32 x1, x1, 0x33333333;",
    ]
    for q in "01":
        for h in "ab":
            if h == "b":
                body.append(f"shr.b32 x{q}, x{q}, 16;")
            body += [
                f"prmt.b32 l{q}{h}, $Tl, {th:#010x}, x{q};",
                f"prmt.b32 h{q}{h}, $Th, {tl:#010x}, x{q};",
            ]
    out = 0
    if wb == 1:  # bytes e0..e3; x_q holds index 2j + q of byte e at nibble 2e + j
        for r in range(4):
            q, j = r % 2, r // 2
            sel = j | (4 + j) << 4 | (2 + j) << 8 | (6 + j) << 12
            for h in "ab":  # (e0, e1) then (e2, e3)
                body.append(f"prmt.b32 ${out}, l{q}{h}, h{q}{h}, {sel:#06x};")
                out += 1
    else:  # words a (low half), b (high half); x_q holds index 2k + q of a at nibble k
        for q in (0, 1):
            for k in (0, 2):
                sel = k | (4 + k) << 4 | (k + 1) << 8 | (5 + k) << 12
                body += [
                    f"prmt.b32 ua, l{q}a, h{q}a, {sel:#06x};",
                    f"prmt.b32 ub, l{q}b, h{q}b, {sel:#06x};",
                    f"prmt.b32 ${2 * k + q}, ua, ub, 0x5410;",
                    f"prmt.b32 ${2 * k + 2 + q}, ua, ub, 0x7632;",
                ]
    return decl, body


def lut_asm(wb: int, bits: int, codebook: list[int]) -> tuple[str, str, int]:
    """(asm, constraints, outputs) giving every sub-stream of ``pack`` words at once as fp16
    codewords: output ``r`` (``pack/2`` registers each) holds index ``r`` of each word.

    ``codebook``: the ``2**bits`` fp16 bit patterns. 4-bit indices in 1-, 2- or 4-byte words,
    2-bit indices in 1- or 2-byte words (at most 8 indices per word). After the words the asm
    takes the :func:`table_words` as scalar inputs."""
    n = 1 << bits
    if bits == 2 and wb in (1, 2) and len(codebook) == n:
        pack = PACK[wb]
        n_out = wb * 4 * pack // 2
        decl, body = _lut4_asm(wb, codebook)
        body = [b.replace("$IN", f"${n_out}") for b in body]
        asm = "\n".join(["{", f".reg .b32 {', '.join(decl)};", *body, "}"])
        return _table_regs(asm, ("$Tl", "$Th"), n_out, 1, pack)
    if bits != 4 or wb not in PACK or len(codebook) != n:
        raise ValueError(
            f"no codebook lookup for {wb}-byte words of {bits}-bit indices ({len(codebook)} codewords)"
        )
    pack = PACK[wb]
    per = wb * 8 // bits
    n_in = pack * wb // 4
    n_out = per * pack // 2
    tl = _words([c & 0xFF for c in codebook])  # 4 registers of low bytes
    th = _words([c >> 8 for c in codebook])
    src = [f"${n_out + i}" for i in range(n_in)]
    decl: list[str] = []
    body: list[str] = []
    for i, s in enumerate(src):
        regs, ops = _lut16_bytes(s, tl, th, f"r{i}")
        decl += regs
        body += ops
    outs: list[str] = []  # output registers in order: sub-stream r, then its pack/2 registers
    if wb == 1:  # one register: words e0..e3, nibble 2e + r; output r = (e0, e1), (e2, e3)
        for r in range(2):
            for k in range(2):  # register k: words 2k, 2k+1 -> nibbles r, 2 + r of half k
                sel = r | (4 + r) << 4 | (2 + r) << 8 | (6 + r) << 12
                body.append(f"prmt.b32 ${len(outs)}, r0l{k}, r0h{k}, {sel:#06x};")
                outs.append(f"${len(outs)}")
    else:  # 2-byte words: word a = nibbles 0..3, word b = nibbles 4..7 of one register (r0*0,
        # r0*1); 4-byte words: one word per register, a = r0*, b = r1*, nibble r in half r // 4
        decl += ["ua", "ub"]
        for r in range(0, per, 2):
            half, k = divmod(r, 4)
            sel = k | (4 + k) << 4 | (k + 1) << 8 | (5 + k) << 12  # (lo, hi) of nibbles k, k + 1
            a_l, a_h, b_l, b_h = (
                ("r0l0", "r0h0", "r0l1", "r0h1")
                if wb == 2
                else (f"r0l{half}", f"r0h{half}", f"r1l{half}", f"r1h{half}")
            )
            body += [
                f"prmt.b32 ua, {a_l}, {a_h}, {sel:#06x};",
                f"prmt.b32 ub, {b_l}, {b_h}, {sel:#06x};",
                f"prmt.b32 ${r}, ua, ub, 0x5410;",  # index r of words a, b
                f"prmt.b32 ${r + 1}, ua, ub, 0x7632;",  # index r + 1
            ]
    asm = "\n".join(["{", f".reg .b32 {', '.join(decl)};", *body, "}"])
    return _table_regs(asm, ("$Tl0", "$Tl2", "$Th0", "$Th2"), n_out, n_in, pack)


def _table_regs(asm: str, names: tuple[str, ...], n_out: int, n_in: int, pack: int) -> tuple[str, str, int]:
    """Point the table placeholders at the scalar inputs that follow the words (each broadcast
    input arrives as ``pack`` registers; the first is used)."""
    for j, name in enumerate(names):
        asm = asm.replace(name + ",", f"${n_out + n_in + j * pack},")
    return asm, ",".join(["=r"] * n_out + ["r"] * (n_in + len(names) * pack)), n_out


def table_words(codebook: list[int]) -> tuple[int, ...]:
    """The scalar inputs :func:`lut_asm`'s asm takes after the words, as the kernel computes them
    (``kernel_sub._table_words``): low-byte words 0 and 2 then high-byte words 0 and 2 of a
    16-level codebook, or the low- and high-byte words of a 4-level one.

    Why registers and not immediates: ``prmt`` takes at most one immediate table operand, and
    ptxas rematerialized the other before every ``prmt`` from a uniform register (an extra
    ``IMAD.U32`` per lookup, 255 registers); as kernel values they stay in 4 registers
    (45 -> 39 warp-instructions per token for TurboQuant b=4, 194 registers)."""
    tl, th = _words([c & 0xFF for c in codebook]), _words([c >> 8 for c in codebook])
    return (tl[0], tl[2], th[0], th[2]) if len(codebook) == 16 else (tl[0], th[0])
