"""Core: specs, registries, errors, byte accounting, seeding. Imports nothing else of kvshrink."""

from .atomic import atomic_write, atomic_write_with
from .bytes import fp16_nbytes, tensor_nbytes
from .errors import DataError, InputError, KvshrinkError, ModelError, SpecError
from .registry import Registry
from .seed import derive_seed, generator
from .spec import SpecConfig, format_config, parse_stage, split_specs, split_stages

__all__ = [
    "DataError",
    "InputError",
    "KvshrinkError",
    "ModelError",
    "Registry",
    "SpecConfig",
    "SpecError",
    "atomic_write",
    "atomic_write_with",
    "derive_seed",
    "format_config",
    "fp16_nbytes",
    "generator",
    "parse_stage",
    "split_specs",
    "split_stages",
    "tensor_nbytes",
]
