"""The benchmark scripts run as ``python benchmarks/NAME.py``, which puts benchmarks/ first on sys.path:
a script named like a package that any of them imports would be imported in its place
(benchmarks/transformers.py once made ``import transformers`` in ptq.py load itself)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _imported_top_level(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


# Scripts that other scripts import on purpose (shared helpers).
SHARED = {"onnx_models", "kernels"}


def test_no_benchmark_script_shadows_a_package_the_scripts_import():
    scripts = {p.stem: p for p in BENCHMARKS.glob("*.py")}
    assert {"ptq", "kernels", "generate"} <= set(scripts)  # the glob found the scripts
    imported = set().union(*(_imported_top_level(p) for p in scripts.values()))
    assert "transformers" in imported  # ptq.py's MiniLM case: the name this test guards
    assert SHARED <= imported & set(scripts)
    clashes = sorted((set(scripts) - SHARED) & (imported | set(sys.stdlib_module_names)))
    assert not clashes, f"benchmarks/ scripts named like imported or standard modules: {clashes}"
