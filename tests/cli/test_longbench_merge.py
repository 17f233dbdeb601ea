"""``longbench_smollm2.py --merge``: rows measured by ``--add`` in copies of a saved run (another
machine, parallel processes) are joined back; copies of a different run are refused."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAVED = ROOT / "docs" / "results" / "longbench-smollm2-needle8x.json"


@pytest.fixture
def bench(bench_module):
    return bench_module("longbench_smollm2")


def _copy_with_row(src: dict, name: str, acc: float, ratio: float) -> dict:
    other = copy.deepcopy(src)
    row = dict(other["rows"][1], method=name, accuracy=acc, compression_ratio=ratio, device="elsewhere")
    other["rows"].append(row)
    other["methods"].append(name)
    other.setdefault("added", []).append({"methods": [name], "device": "elsewhere", "seconds": 1.0})
    return other


def test_merge_joins_new_rows_and_recomputes_verdicts(bench, tmp_path: Path) -> None:
    shutil.copy(SAVED, tmp_path / "run.json")
    base = json.loads(SAVED.read_text())
    # above every measured row (the saved run's own best at >= 8x must not decide the verdict)
    for i, (acc, ratio) in enumerate([(99.0, 8.1), (100.0, 7.9)]):
        (tmp_path / f"c{i}.json").write_text(
            json.dumps(_copy_with_row(base, f"fibquant:b={i + 2}", acc, ratio))
        )
    files = [str(tmp_path / "c0.json"), str(tmp_path / "c1.json")]
    assert bench.merge_files(tmp_path, "run", files) == 0
    data = json.loads((tmp_path / "run.json").read_text())
    assert len(data["rows"]) == len(base["rows"]) + 2
    assert data["methods"][-2:] == ["fibquant:b=2", "fibquant:b=3"]
    assert [a["device"] for a in data["added"][-2:]] == ["elsewhere", "elsewhere"]
    # the 100% row is below 8x total: the 99% row is the one that meets the target
    (tv,) = data["total_verdict"]
    assert (tv["best"], tv["met"]) == ("fibquant:b=2", True)
    assert "fibquant:b=2" in data["levels"]["8"]["candidates"]
    # merging the same copy again adds nothing
    bench.merge_files(tmp_path, "run", files[:1])
    assert len(json.loads((tmp_path / "run.json").read_text())["rows"]) == len(data["rows"])


def test_merge_refuses_another_run(bench, tmp_path: Path) -> None:
    shutil.copy(SAVED, tmp_path / "run.json")
    other = json.loads(SAVED.read_text())
    other["cases"] = 10
    (tmp_path / "c.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="cases=10"):
        bench.merge_files(tmp_path, "run", [str(tmp_path / "c.json")])
