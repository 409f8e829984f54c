"""Where sampling runs (DESIGN.md "What runs where") and how a trainer that cannot start is reported."""

from __future__ import annotations

import tinker
from tinker import types

from tests.component.gateway.conftest import TINY
from tests.support.eventually import eventually_sync
from tests.support.fake_trainer import BROKEN_MODEL
from tests.support.gateway_raw import new_session, retrieve
from tests.support.sdk import DEV_KEY, GatewayProc


def _sample(client: tinker.SamplingClient) -> types.SampleResponse:
    return client.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2)).result()


def _attached(gw: GatewayProc) -> list[str]:
    return sorted(run for runs in gw.pools().values() for run in runs)


def test_a_checkpoint_whose_trainer_is_gone_gets_a_sampler_process(shared_gateway: GatewayProc) -> None:
    first = tinker.ServiceClient(base_url=shared_gateway.url, api_key=DEV_KEY)
    training = first.create_lora_training_client(base_model=TINY, rank=4).result()
    path = training.save_weights_for_sampler("gone").result().path
    with shared_gateway.http() as http:
        session_id = training.model_id.split(":train:")[0]
        assert http.post(f"/api/v1/sessions/{session_id}/finish", json={"reason": {"type": "success"}}).is_success
    eventually_sync(lambda: _attached(shared_gateway), lambda runs: training.model_id not in runs, timeout=15,
                    what="the run detached from its pool")
    second = tinker.ServiceClient(base_url=shared_gateway.url, api_key=DEV_KEY)
    sampler = second.create_sampling_client(model_path=path)
    assert len(_sample(sampler).sequences) == 1
    samplers = [run for run in _attached(shared_gateway) if ":sampler:" in run]
    assert samplers  # a sampler (mode=sample, restore_from=path) attached to a pool serves it
    again = second.create_sampling_client(model_path=path)
    assert _sample(again).sequences
    assert [r for r in _attached(shared_gateway) if ":sampler:" in r] == samplers  # shared, not a new one


def test_a_trainer_that_cannot_start_fails_the_create_future_clearly(shared_gateway: GatewayProc) -> None:
    with shared_gateway.http() as http:
        session_id = new_session(http)
        submitted = http.post("/api/v1/create_model", json={"session_id": session_id, "model_seq_id": 0,
                                                             "base_model": BROKEN_MODEL})
        failed = retrieve(http, submitted.json()["request_id"]).json()
    assert "failed to start" in failed["error"] and "exited with code 3" in failed["error"]
    assert "cannot load broken/model" in failed["error"]  # the trainer's last log lines
