"""kvshrink: compress the KV cache of transformer language models, with fidelity measured.

``import kvshrink`` is light: it pulls in no triton, redis or matplotlib and never touches CUDA.
"""

from . import codecs
from ._version import __version__
from .cache import _lazy_top as __getattr__  # noqa: F401  (lazy CompressedCache: imports transformers on use)
from .codecs import Codec, Packed, make_codec
from .core import KvshrinkError, SpecError
from .models import load_model

__all__ = [
    "Codec",
    "KvshrinkError",
    "Packed",
    "SpecError",
    "__version__",
    "codecs",
    "load_model",
    "make_codec",
]
