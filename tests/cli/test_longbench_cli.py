"""``kvshrink longbench``: one-line errors with exit 2, and the files and JSON schema it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import kvshrink.cli.longbench as longbench_cli
from kvshrink.cli.__main__ import main
from tests.tiny_chat import tiny_chat_model

ROW_KEYS = {"method", "task", "length", "accuracy", "compression_ratio", "resident_ratio"}


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--methods", "int9"], "unknown stage 'int9'"),
        (["--methods", "kivi:b=3"], "b must be 2 or 4"),
        (["--methods", "kvpress/nosuch:ratio=0.5"], "unknown kvpress press 'nosuch'"),
        (["--methods", "kvpress/snapkv:ratio=2"], "must be in (0, 1)"),
        (["--tasks", "niah_single;nosuch"], "unknown task 'nosuch'"),
        (["--tasks", "vt:hops=0"], "hops must be >= 1"),
        (["--lengths", "1024,abc"], "--lengths must be integers"),
        (["--lengths", "32"], ">= 64 tokens"),
        (["--cases", "0"], "--cases must be >= 1"),
        (["--cases", "x"], "invalid int value"),
        (["--model", "/nonexistent/model.gguf"], "neither an embedded name"),
        (["--text", "/nonexistent.txt"], "neither an embedded name"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, tmp_path: Path, argv: list[str], match: str) -> None:
    code, err = _run(capsys, ["longbench", *argv, "--out", str(tmp_path / "o")])
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("kvshrink: error:")
    assert match in err
    assert not (tmp_path / "o").exists()


def test_end_to_end_small_run(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(longbench_cli, "_load", lambda name: tiny_chat_model())
    out = tmp_path / "o"
    argv = [
        "longbench",
        "--methods",
        "none;int8",
        "--tasks",
        "niah_single:max_new_tokens=3",
        "--lengths",
        "200",
    ]
    assert main([*argv, "--cases", "2", "--out", str(out), "--replies"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["longbench.json", "longbench.md", "longbench.png"]
    assert (out / "longbench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "longbench.json").read_text())
    assert {"model", "rows"} <= set(data) and data["methods"] == ["none", "int8"]
    assert [r["method"] for r in data["rows"]] == ["none", "int8"]
    for r in data["rows"]:
        assert ROW_KEYS <= set(r) and r["task"] == "niah_single:max_new_tokens=3" and r["length"] == 200
        assert isinstance(r["accuracy"], float) and r["compression_ratio"] > 0 and r["resident_ratio"] > 0
    assert len(data["replies"]) == 4
    assert "| `int8` |" in (out / "longbench.md").read_text()


@pytest.mark.slow
@pytest.mark.heavy
def test_quick_run_as_a_user_would(tmp_path: Path) -> None:
    """`kvshrink longbench --quick` in a subprocess on SmolLM2: the model answers uncompressed."""
    out = tmp_path / "q"
    proc = subprocess.run(
        [sys.executable, "-m", "kvshrink.cli", "longbench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / "longbench.json").read_text())
    rows = {(r["method"], r["task"]): r for r in data["rows"]}
    assert rows[("none", "niah_single")]["accuracy"] == 100.0
    assert rows[("none", "niah_single")]["compression_ratio"] == 1.0
    assert rows[("kivi:b=2", "niah_single")]["compression_ratio"] > 2.0
