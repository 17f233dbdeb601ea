"""Policies: which cached tokens stay, per layer and KV head, built from spec strings.

Importing this package registers every policy. ``make_policy("snapkv:ratio=0.75")`` builds one.
"""

from . import arkvale, h2o, quest, snapkv, streaming  # noqa: F401  (registration side effects)
from .base import POLICIES, Decision, LayerView, Policy, PolicyConfig, make_policy, register_policy

__all__ = ["POLICIES", "Decision", "LayerView", "Policy", "PolicyConfig", "make_policy", "register_policy"]
