"""Imports point one way: the core never imports ray, workers or rewards; rewards never imports workers."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Entry points may reach every layer; the core below them may not.
ENTRY_POINTS = {*(ROOT / "rlflow" / "cli").glob("*.py"), ROOT / "rlflow" / "jobs.py", ROOT / "rlflow" / "__main__.py"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize(
    "package,forbidden",
    [("rlflow", {"ray", "workers", "rewards"}), ("rewards", {"workers", "ray"})],
)
def test_imports_point_down(package, forbidden):
    offenders = {}
    for path in (ROOT / package).rglob("*.py"):
        if path in ENTRY_POINTS:
            continue
        bad = _imported_roots(path) & forbidden
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders


def _imported_modules(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
    return mods


@pytest.mark.parametrize("package", ["workers", "rewards", "rlflow"])
def test_nothing_below_imports_the_entry_points(package):
    """workers/ (and rewards/, and the core) never reach up into the CLI or the job client."""
    entry = ("rlflow.cli", "rlflow.jobs", "rlflow.__main__")
    offenders = {}
    for path in (ROOT / package).rglob("*.py"):
        if path in ENTRY_POINTS:
            continue
        bad = {m for m in _imported_modules(path) if m.startswith(entry)}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders
