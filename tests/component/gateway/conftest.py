"""Gateway component fixtures: a real gateway process (uvicorn, free port) + the real tinker SDK."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import tinker

from tests.support.sdk import DEV_KEY, GatewayProc, start_gateway

TINY = "tinkerkube/tiny-qwen3"


@pytest.fixture
def gateway(tmp_path: Path, model_cache_dir: Path) -> Iterator[GatewayProc]:
    gw = start_gateway(tmp_path / "state", model_cache_dir=model_cache_dir)
    yield gw
    gw.stop()


@pytest.fixture
def service_client(gateway: GatewayProc) -> Iterator[tinker.ServiceClient]:
    client = tinker.ServiceClient(base_url=gateway.url, api_key=DEV_KEY)
    yield client
