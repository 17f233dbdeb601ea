"""Policies: which cached tokens stay, per layer and KV head, built from spec strings.

Importing this package registers every policy. ``make_policy("snapkv:ratio=0.75")`` builds one.
"""

from . import (  # noqa: F401  (registration side effects)
    a2sf,
    arkvale,
    h2o,
    lazyeviction,
    mikv,
    pyramidkv,
    quest,
    razor,
    scissorhands,
    snapkv,
    streaming,
    zipcache,
)
from .base import (
    POLICIES,
    UNIFORM,
    Decision,
    LayerView,
    Observation,
    Policy,
    PolicyConfig,
    make_policy,
    register_policy,
)
from .precision import PrecisionConfig

__all__ = [
    "POLICIES",
    "UNIFORM",
    "Decision",
    "LayerView",
    "Observation",
    "Policy",
    "PolicyConfig",
    "PrecisionConfig",
    "make_policy",
    "register_policy",
]
