"""Kernels that work on packed caches without decoding them, each with a torch reference.

One folder per kernel (``reference.py`` is the spec, ``kernel.py`` the Triton version, dispatch in
``__init__.py``). Importing this package imports no Triton and touches no GPU.
"""

from .decode_attn import Window, decode_attention, decode_attention_ref, triton_available
from .encode import encode_vq, encode_vq_ref
from .layout import CodeLayout, dequantize, layout_of

__all__ = [
    "CodeLayout",
    "Window",
    "decode_attention",
    "decode_attention_ref",
    "dequantize",
    "encode_vq",
    "encode_vq_ref",
    "layout_of",
    "triton_available",
]
