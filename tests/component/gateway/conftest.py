"""Gateway component fixtures: a real gateway process (uvicorn, free port) + the real tinker SDK.

`shared_gateway` is session-scoped (starting a gateway costs seconds on 2 cores); tests that restart
or reap use the function-scoped `gateway`. Trainers are the fake trainer unless a test asks for the
real one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import tinker
from tinker import types

from tests.support.sdk import DEV_KEY, GatewayProc, start_gateway

TINY = "tinkerkube/tiny-qwen3"


def sft_batch(seed: int) -> list[types.Datum]:
    """Three short SFT datums of different lengths, a different batch per seed."""
    out = []
    for i in range(3):
        tokens = [(seed * 31 + i * 7 + j * 3) % 300 + 5 for j in range(8 + i)]
        out.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                               loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)}))
    return out


@pytest.fixture
def gateway(tmp_path: Path, model_cache_dir: Path) -> Iterator[GatewayProc]:
    gw = start_gateway(tmp_path / "state", model_cache_dir=model_cache_dir)
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def shared_gateway(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path) -> Iterator[GatewayProc]:
    extra = {"TINKERKUBE_GATEWAY_FWDBWD_MAX_CHUNK_LEN": "2", "TINKERKUBE_GATEWAY_MAX_BODY_BYTES": "2000000",
             "TINKERKUBE_GATEWAY_REAPER_INTERVAL_SECONDS": "0.5",
             "TINKERKUBE_GATEWAY_API_KEYS": '{"tml-alice": "alice", "tml-bob": "bob", "tml-local": "local"}'}
    gw = start_gateway(tmp_path_factory.mktemp("gw") / "state", model_cache_dir=model_cache_dir, extra_env=extra)
    yield gw
    gw.stop()


@pytest.fixture
def service_client(shared_gateway: GatewayProc) -> Iterator[tinker.ServiceClient]:
    client = tinker.ServiceClient(base_url=shared_gateway.url, api_key=DEV_KEY)
    yield client


@pytest.fixture(scope="module")
def real_gateway(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
                 model_cache_dir: Path) -> Iterator[GatewayProc]:
    """Real trainer process groups (torchrun + tinkerkube_trainer) on the tiny model."""
    extra = {"TINKERKUBE_GATEWAY_FWDBWD_MAX_CHUNK_LEN": "2", "TINKERKUBE_GATEWAY_PROTO_COMPRESS_FWDBWD": "true"}
    gw = start_gateway(tmp_path_factory.mktemp("gw-real") / "state", model_cache_dir=model_cache_dir,
                       real_trainer=True, extra_env=extra)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def real_client(real_gateway: GatewayProc) -> Iterator[tinker.ServiceClient]:
    with tinker.ServiceClient(base_url=real_gateway.url, api_key=DEV_KEY) as client:
        yield client


@pytest.fixture(scope="module")
def training(real_client: tinker.ServiceClient) -> tinker.TrainingClient:
    """One LoRA run (one trainer process group) shared by a module's tests, which run in order."""
    return real_client.create_lora_training_client(base_model=TINY, rank=8,
                                                   user_metadata={"renderer_name": "role_colon"}).result()


COMPAT_KEYS = '{"tml-alice": "alice", "tml-bob": "bob"}'


@pytest.fixture(scope="module")
def compat_gateway(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
                   model_cache_dir: Path) -> Iterator[GatewayProc]:
    """Real trainers on the tiny model and two tenants (alice, bob), for the OpenAI/Anthropic-compatible APIs."""
    gw = start_gateway(tmp_path_factory.mktemp("gw-compat") / "state", model_cache_dir=model_cache_dir,
                       real_trainer=True, extra_env={"TINKERKUBE_GATEWAY_API_KEYS": COMPAT_KEYS})
    yield gw
    gw.stop()
