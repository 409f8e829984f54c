"""Suite-wide configuration: tier markers follow the directory, so a test is never left untiered."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
_TIER_BY_DIR = {"unit": "unit", "component": "component", "cluster": "cluster", "kind": "kind", "chart": "chart"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(ROOT)
        tier = _TIER_BY_DIR.get(rel.parts[0]) if rel.parts else None
        if tier:
            item.add_marker(getattr(pytest.mark, tier))
