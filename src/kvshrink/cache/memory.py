"""Peak host memory of a call, for checking that quantize-on-write keeps prefill lean.

``tracemalloc`` does not see torch's CPU allocations (they bypass Python's allocator), so this
reads glibc's heap counters (``mallinfo2``: in-use small blocks plus mmapped large ones) after
every aten op, through a ``TorchDispatchMode``. torch's CPU allocator does not cache, so freed
tensors leave the count at once. Linux/glibc only; elsewhere :func:`peak_heap` raises.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

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


def heap_in_use() -> int:
    """Bytes of the C heap in use now (small blocks + mmapped blocks)."""
    info = _libc().mallinfo2()
    return int(info.uordblks + info.hblkhd)


class _Probe(TorchDispatchMode):
    def __init__(self, lib: Any) -> None:
        super().__init__()
        self.lib = lib
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        info = self.lib.mallinfo2()
        self.peak = max(self.peak, int(info.uordblks + info.hblkhd))
        return out


def peak_heap(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` and return ``(result, peak heap bytes above the level before the call)``."""
    lib = _libc()
    start = heap_in_use()
    probe = _Probe(lib)
    with probe:
        result = fn()
    return result, max(probe.peak, heap_in_use()) - start
