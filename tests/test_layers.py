"""The folders say the architecture: imports point down only.

HTTP and the flusher (``service/``) and the background jobs (``rollups/``) import
the shared ``core/``; ``service/`` may start the rollups process; ``rollups/`` never
imports ``service/``, and ``core/`` imports neither.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from scripts.stack import ROOT

MAY_IMPORT = {
    "core": {"core"},
    "rollups": {"core", "rollups"},
    "service": {"core", "rollups", "service"},
}


def imported_packages(path: Path) -> set[tuple[int, str]]:
    """(line, top-level package) of every absolute import, type-checking ones included."""
    found: set[tuple[int, str]] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.lineno, node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_imports_point_down_only(package: str) -> None:
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules, f"{package}/ has no modules"
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {imported}"
             for path in modules for line, imported in sorted(imported_packages(path))
             if imported in MAY_IMPORT and imported not in MAY_IMPORT[package]]  # fmt: skip
    assert not wrong, wrong


def test_the_check_sees_a_wrong_import(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    import service.app\n"
    )
    assert (4, "service") in imported_packages(module)
