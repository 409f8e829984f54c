"""One local-mode gateway with real trainers for the cookbook recipes (tests.support.sdk.start_gateway)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.sdk import start_gateway


@pytest.fixture(scope="module")
def cookbook_gateway(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path,
                     tiny_model_dir: Path) -> Iterator[str]:
    """The gateway's base URL; it serves the tiny model's directory (the recipes' `model_name`) as a local
    model, which is what `resolve_model` does with an existing directory."""
    gw = start_gateway(tmp_path_factory.mktemp("cookbook-gateway"), model_cache_dir=model_cache_dir,
                       real_trainer=True)
    try:
        yield gw.url
    finally:
        gw.stop()
