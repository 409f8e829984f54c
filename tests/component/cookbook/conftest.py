"""One local-mode gateway with real trainers for the cookbook recipes (tests.support.sdk.start_gateway)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.sdk import GatewayProc, start_gateway


@pytest.fixture(scope="session")
def cookbook_gateway_proc(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path,
                          tiny_model_dir: Path) -> Iterator[GatewayProc]:
    """The gateway, shared by every cookbook test module (one trainer pool start for them all); it
    serves the tiny model's directory (the recipes' `model_name`) as a local model, which is what
    `resolve_model` does with an existing directory."""
    gw = start_gateway(tmp_path_factory.mktemp("cookbook-gateway"), model_cache_dir=model_cache_dir,
                       real_trainer=True)
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="session")
def cookbook_gateway(cookbook_gateway_proc: GatewayProc) -> str:
    """The gateway's base URL."""
    return cookbook_gateway_proc.url
