"""kvshrink: compress the KV cache of transformer language models, with fidelity measured."""

from ._version import __version__

__all__ = ["__version__"]
