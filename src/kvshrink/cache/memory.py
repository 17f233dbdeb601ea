"""Peak host memory of a call, for checking that quantize-on-write keeps prefill lean.

``tracemalloc`` does not see torch's CPU allocations (they bypass Python's allocator), and the
resident-set high-water mark is too coarse (pages freed earlier get reused unseen, run to run
it varied by 80 MB). This reads glibc's heap counters (``mallinfo2``: in-use small blocks plus
mmapped large ones) through a ``TorchDispatchMode`` after every aten op whose outputs hold at
least ``sample_bytes``: peaks happen when large tensors are born, and reading the counters
after every op would slow a long prefill several-fold. torch's CPU allocator does not cache,
so freed tensors leave the count at once. Linux/glibc only; elsewhere :func:`peak_heap` raises.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..core.errors import InputError

__all__ = ["heap_in_use", "peak_heap"]


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc() -> Any:
    lib = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(lib, "mallinfo2"):
        raise InputError("peak_heap needs glibc >= 2.33 (mallinfo2); not available on this platform")
    lib.mallinfo2.restype = _MallInfo2
    return lib


def _in_use(lib: Any) -> int:
    info = lib.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def heap_in_use() -> int:
    """Bytes of the C heap in use now (small blocks + mmapped blocks)."""
    return _in_use(_libc())


class _Probe(TorchDispatchMode):
    def __init__(self, lib: Any, sample_bytes: int) -> None:
        super().__init__()
        self.lib, self.sample_bytes = lib, sample_bytes
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        born = sum(t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        if born >= self.sample_bytes:
            self.peak = max(self.peak, _in_use(self.lib))
        return out


def peak_heap(fn: Callable[[], Any], sample_bytes: int = 1 << 20) -> tuple[Any, int]:
    """Run ``fn``; return ``(result, peak heap bytes above the level before the call)``."""
    lib = _libc()
    start = _in_use(lib)
    probe = _Probe(lib, sample_bytes)
    with probe:
        result = fn()
    return result, max(probe.peak, _in_use(lib)) - start
