"""Evaluation: KV capture, fidelity metrics, the frontier, reports and plots."""

from .capture import Capture, LayerCapture, capture
from .frontier import FrontierConfig, FrontierResult, run_frontier
from .metrics import attention_fidelity, token_nll_kl

__all__ = [
    "Capture",
    "FrontierConfig",
    "FrontierResult",
    "LayerCapture",
    "attention_fidelity",
    "capture",
    "run_frontier",
    "token_nll_kl",
]
