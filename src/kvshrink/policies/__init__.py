"""Policies: which cached tokens stay, per layer and KV head, built from spec strings.

Importing this package registers every policy. ``make_policy("snapkv:ratio=0.75")`` builds one.
"""

from . import h2o, mikv, razor, snapkv, streaming, zipcache  # noqa: F401  (registration side effects)
from .base import POLICIES, Decision, LayerView, Policy, PolicyConfig, make_policy, register_policy
from .precision import PrecisionConfig

__all__ = [
    "POLICIES",
    "Decision",
    "LayerView",
    "Policy",
    "PolicyConfig",
    "PrecisionConfig",
    "make_policy",
    "register_policy",
]
