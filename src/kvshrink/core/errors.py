"""Error types.

Every error a user can cause derives from :class:`KvshrinkError`, so the CLI can print one line
and exit 2 for all of them while genuine bugs still surface as tracebacks.
"""

from __future__ import annotations

__all__ = ["DataError", "InputError", "KvshrinkError", "ModelError", "SpecError"]


class KvshrinkError(Exception):
    """Base of every error caused by user input (bad spec, bad file, bad tensor)."""


class SpecError(KvshrinkError, ValueError):
    """A method spec string or one of its options is invalid."""


class InputError(KvshrinkError, ValueError):
    """A tensor handed to a codec is unusable (NaN, wrong dtype, wrong device, bad shape)."""


class ModelError(KvshrinkError):
    """A model name or path cannot be resolved or its architecture is unsupported."""


class DataError(KvshrinkError):
    """A text source or stored file cannot be read or fails its integrity check."""
