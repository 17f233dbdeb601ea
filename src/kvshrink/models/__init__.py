"""Model loading: embedded GGUF models, local GGUF files and HF folders (no hub at run time)."""

from .loader import SUPPORTED_ARCHITECTURES, gguf_architecture, load_model, resolve_model
from .registry import EMBEDDED_MODELS, package_dir

__all__ = [
    "EMBEDDED_MODELS",
    "SUPPORTED_ARCHITECTURES",
    "gguf_architecture",
    "load_model",
    "package_dir",
    "resolve_model",
]
