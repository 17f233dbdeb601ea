"""Codecs: fixed-rate packed representations of cached vectors, built from spec strings.

Importing this package registers every codec. ``make_codec("kivi:b=2")`` builds one.
"""

from . import fibquant, kivi, plain, turboquant  # noqa: F401  (registration side effects)
from .base import CODECS, Codec, CodecConfig, Packed, Role, make_codec, register_codec

__all__ = ["CODECS", "Codec", "CodecConfig", "Packed", "Role", "make_codec", "register_codec"]
