"""Gateway component fixtures: a real gateway process (uvicorn, free port) + the real tinker SDK.

`shared_gateway` is module-scoped (starting a gateway costs seconds on 2 cores); tests that restart
or reap use the function-scoped `gateway`. Trainers are the fake trainer unless a test asks for the
real one.
"""

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


@pytest.fixture(scope="module")
def shared_gateway(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path) -> Iterator[GatewayProc]:
    extra = {"TINKERKUBE_GATEWAY_FWDBWD_MAX_CHUNK_LEN": "2", "TINKERKUBE_GATEWAY_MAX_BODY_BYTES": "2000000",
             "TINKERKUBE_GATEWAY_API_KEYS": '{"tml-alice": "alice", "tml-bob": "bob", "tml-local": "local"}'}
    gw = start_gateway(tmp_path_factory.mktemp("gw") / "state", model_cache_dir=model_cache_dir, extra_env=extra)
    yield gw
    gw.stop()


@pytest.fixture
def service_client(shared_gateway: GatewayProc) -> Iterator[tinker.ServiceClient]:
    client = tinker.ServiceClient(base_url=shared_gateway.url, api_key=DEV_KEY)
    yield client
