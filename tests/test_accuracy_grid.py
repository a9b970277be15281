"""benchmarks/accuracy.py end to end on a tiny grid (digits, one model, one bit width)."""

import importlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script(monkeypatch):
    # Imported as a module on sys.path: the grid's worker processes (spawned) import it the same way.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("accuracy")


def test_quick_grid_writes_the_table_from_its_runs(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib", reason="the grid draws its PNG with matplotlib")
    acc = _load_script(monkeypatch)
    runs, results = tmp_path / "runs", tmp_path / "results"
    argv = ["--quick", "--data", "digits", "--models", "mnist-fc", "--bits", "5", "--jobs", "1",
            "--runs", str(runs), "--results", str(results)]
    assert acc.main(argv) == 0
    table = (results / "accuracy-quick.md").read_text()
    assert (results / "accuracy-quick.png").stat().st_size > 1000
    run_dir = Path(str(runs) + "-quick") / "mnist-fc"
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == ["float", "ps5-float", "ps5-scratch", "q5-float", "q5-scratch"]
    # Every cell is the run's own test top-1, and the from-float runs started from the float run.
    for name in names:
        m = json.loads((run_dir / name / "metrics.json").read_text())
        assert f"| mnist-fc/{name} | 1 |" in table and f"{m['test_top1']:.2f}" in table
    cfg = json.loads((run_dir / "q5-float" / "config.json").read_text())["train"]
    assert cfg["from_checkpoint"] == str(run_dir / "float" / "best.pt")
    assert "post-training" in table and "Produced by `python benchmarks/accuracy.py --quick" in table
    # A second call reuses the finished runs (same configs) and says so.
    capsys.readouterr()
    assert acc.main(argv) == 0
    assert capsys.readouterr().out.count("(reused)") == 5
