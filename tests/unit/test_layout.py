"""Keeps the layout honest (STYLE.md): small modules, settings read in one place, boundaries enforced."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = [
    REPO / "crds" / "tinkerkube_contract",
    REPO / "api_gateway" / "tinkerkube_gateway",
    REPO / "operator" / "tinkerkube_operator",
    REPO / "trainer_pod" / "tinkerkube_trainer",
]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# Modules allowed to read the process environment: each component's settings, and the contract's
# XDG cache lookup (a default, not configuration).
ENV_READERS = {"settings.py", "models.py"}


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES if pkg.exists() for p in pkg.rglob("*.py"))


def test_there_is_code_to_check() -> None:
    assert len(_modules()) >= 5


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_module_is_small(path: Path) -> None:
    lines = path.read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines; split it (limit {MAX_MODULE_LINES})"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_functions_are_short(path: Path) -> None:
    tree = ast.parse(path.read_text())
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines in {path.name}: {long}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_environment_is_read_only_by_settings(path: Path) -> None:
    if path.name in ENV_READERS:
        return
    text = path.read_text()
    assert "os.environ" not in text and "os.getenv" not in text, (
        f"{path.relative_to(REPO)} reads the environment; read it once in settings.py and pass values down"
    )


def test_operator_folder_is_not_a_package() -> None:
    # `operator` is a stdlib module: a package of that name would shadow it or fail to import.
    assert not (REPO / "operator" / "__init__.py").exists()


def test_import_boundaries_hold() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_test_module_names_are_unique_outside_packages() -> None:
    """Test folders without __init__.py import their modules by basename: two `test_x.py` in such folders
    stop the whole collection ("import file mismatch")."""
    seen: dict[str, Path] = {}
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        if (path.parent / "__init__.py").exists():
            continue
        assert path.name not in seen, f"{path.relative_to(REPO)} and {seen[path.name].relative_to(REPO)} share a name"
        seen[path.name] = path
    assert seen
