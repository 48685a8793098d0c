"""The dependency direction of docs/ARCHITECTURE.md, read from every import (lazy ones too):
router and kvutil import nothing else of the project; gateway and engines import router and kvutil
but never each other; loadgen imports router, and engines only in its simulator."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("router", "kvutil", "gateway", "engines", "loadgen")

# package -> the other project packages it may import
ALLOWED: dict[str, set[str]] = {
    "router": set(),
    "kvutil": set(),
    "gateway": {"router", "kvutil"},
    "engines": {"router", "kvutil"},
    "loadgen": {"router"},
}
SIMULATOR_ALLOWED = {"router", "engines"}  # loadgen/sim drives the real engine in virtual time


def imported_packages(path: Path) -> set[str]:
    """The project packages a module imports, at any depth of its code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names & set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_what_the_dependency_direction_allows(package: str) -> None:
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules, f"{package}/ has no modules"
    wrong: dict[str, set[str]] = {}
    for module in modules:
        relative = module.relative_to(ROOT)
        allowed = SIMULATOR_ALLOWED if relative.parts[:2] == ("loadgen", "sim") else ALLOWED[package]
        extra = imported_packages(module) - allowed - {package}
        if extra:
            wrong[str(relative)] = extra
    assert not wrong, f"imports against the dependency direction: {wrong}"
