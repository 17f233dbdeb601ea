"""Load a causal LM and its tokenizer from an embedded name, a .gguf file or a local HF folder."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import ModelError
from .registry import EMBEDDED_MODELS, resolve_embedded

__all__ = ["SUPPORTED_ARCHITECTURES", "gguf_architecture", "load_model"]

# Architectures whose attention kvshrink hooks and tests (Llama family and Gemma 3).
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma3")


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file, read from its header only."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as exc:  # a corrupt or non-GGUF file
        raise ModelError(f"{path}: not a readable GGUF file ({type(exc).__name__})") from None


def _check_arch(arch: str, where: str) -> None:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{where}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def resolve_model(name_or_path: str) -> Path:
    """Check a model name or path without loading it: the GGUF file or HF folder to load.

    Fails fast (before any weights are read) on a missing path or an unsupported architecture.
    """
    if name_or_path in EMBEDDED_MODELS:
        gguf = resolve_embedded(name_or_path)
        _check_arch(gguf_architecture(gguf), str(gguf))
        return gguf
    p = Path(name_or_path).expanduser()
    if not p.exists():
        raise ModelError(
            f"model {name_or_path!r} is neither an embedded name ({', '.join(EMBEDDED_MODELS)}) "
            "nor an existing .gguf file or model folder"
        )
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(
                f"{p}: folder has no config.json; give a Hugging Face model folder or a .gguf file"
            )
        import json

        arch = json.loads((p / "config.json").read_text()).get("model_type", "?")
        _check_arch(arch, str(p))
        return p
    if p.suffix != ".gguf":
        raise ModelError(f"{p}: expected a .gguf file or a model folder")
    _check_arch(gguf_architecture(p), str(p))
    return p


def load_model(name_or_path: str = "smollm2-135m", dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` in eval mode.

    ``name_or_path``: an embedded name (``smollm2-135m``, ``gemma3-270m``), a ``.gguf`` file or a
    local Hugging Face folder (with ``config.json``). Nothing is fetched from a hub.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    src = resolve_model(name_or_path)
    if src.is_dir():
        return _finish(
            AutoModelForCausalLM.from_pretrained(src, dtype=dtype, local_files_only=True),
            AutoTokenizer.from_pretrained(src, local_files_only=True),
        )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # GGUF conversion logs one warning per tensor type
    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            src.parent, gguf_file=src.name, dtype=dtype, local_files_only=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return _finish(model, tok)


def _finish(model, tok):
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
