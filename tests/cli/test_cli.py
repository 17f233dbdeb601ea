"""The CLI's bad-input contract: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kvshrink.cli.frontier as frontier_cli
from kvshrink.cli.__main__ import main


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    return exc.value.code, err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["frontier", "--methods", "int9"], "unknown codec 'int9'"),
        (["frontier", "--methods", "kivi:bits=2"], "valid options: b, group, residual"),
        (["frontier", "--methods", "kivi:b=3"], "b must be 2 or 4"),
        (["frontier", "--model", "/nonexistent/model.gguf"], "neither an embedded name"),
        (["frontier", "--text", "/nonexistent.txt"], "neither an embedded name"),
        (["frontier", "--context", "x"], "invalid int value"),
        (["frontier", "--windows", "0"], "--windows must be >= 1"),
        (["nosuch"], "invalid choice"),
        ([], "no command given"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, tmp_path: Path, argv: list[str], match: str) -> None:
    code, err = _run(
        capsys, [*argv, "--out", str(tmp_path / "o")] if argv and argv[0] == "frontier" else argv
    )
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("kvshrink: error:")
    assert match in err
    assert not (tmp_path / "o").exists()


def _tiny_gguf(path: Path, arch: str) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_gguf_architecture(capsys, tmp_path: Path) -> None:
    model = tmp_path / "tiny.gguf"
    _tiny_gguf(model, "gpt2")
    code, err = _run(capsys, ["frontier", "--model", str(model), "--out", str(tmp_path / "o")])
    assert code == 2 and "architecture 'gpt2' is not supported; supported: llama" in err
    assert not (tmp_path / "o").exists()


def test_not_a_gguf(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    code, err = _run(capsys, ["frontier", "--model", str(bad)])
    assert code == 2 and "not a readable GGUF file" in err


def test_head_dim_the_codec_cannot_split(capsys, tmp_path: Path, smollm2, monkeypatch) -> None:
    monkeypatch.setattr(frontier_cli, "_load", lambda name: smollm2)
    code, err = _run(
        capsys, ["frontier", "--methods", "int8;kivi:b=2,group=48,residual=96", "--out", str(tmp_path / "o")]
    )
    assert code == 2 and "does not divide head dim 64" in err
    assert not (tmp_path / "o").exists()


def test_end_to_end_small_run(capsys, tmp_path: Path, smollm2, monkeypatch) -> None:
    monkeypatch.setattr(frontier_cli, "_load", lambda name: smollm2)
    out = tmp_path / "o"
    assert (
        main(
            [
                "frontier",
                "--methods",
                "int8;kivi:b=2",
                "--context",
                "160",
                "--windows",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["frontier.json", "frontier.md", "frontier.png"]
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| `int8` |" in (out / "frontier.md").read_text()


@pytest.mark.slow
def test_quick_run_as_a_user_would(tmp_path: Path) -> None:
    """`kvshrink frontier --quick` in a subprocess: the README's main job, shortened."""
    out = tmp_path / "q"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvshrink.cli",
            "frontier",
            "--quick",
            "--methods",
            "int8;kivi:b=2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    data = json.loads((out / "frontier.json").read_text())
    int8 = next(r for r in data["rows"] if r["method"] == "int8")
    assert int8["attn_cosine"] >= 0.999 and int8["ppl_delta"] <= 0.02
