"""Suite-wide configuration: tier markers follow the directory, so a test is never left untiered."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
_TIER_BY_DIR = {"unit": "unit", "component": "component", "cluster": "cluster", "kind": "kind", "chart": "chart",
                "faults": "faults", "images": "images"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(ROOT)
        tier = _TIER_BY_DIR.get(rel.parts[0]) if rel.parts else None
        if tier:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """Built-in models are materialised once per checkout (idempotent, ~2 s for the tiny one)."""
    path = ROOT.parent / ".cache" / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(model_cache_dir: Path) -> Path:
    """The tiny random Qwen3 + offline BPE tokenizer (tinkerkube/tiny-qwen3) as a local HF directory."""
    from tinkerkube_contract.models import TINY_QWEN3
    from tinkerkube_trainer.model_store import prepare

    return prepare(TINY_QWEN3, model_cache_dir)
