"""retrieve_futures, cancel_future and sampling backpressure, with the real SDK (and raw HTTP where the
SDK hides the wire) against a gateway on fake trainers whose samples take a while."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from tinker import types

from tests.component.gateway.conftest import TINY
from tests.support.sdk import DEV_KEY, GatewayProc, metric_value, start_gateway

SAMPLE_SECONDS = 1.5
PROMPT = {"chunks": [{"tokens": [1, 2, 3], "type": "encoded_text"}]}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path) -> Iterator[GatewayProc]:
    """One sample at a time per pool, one more may wait; samples take SAMPLE_SECONDS on the trainer."""
    extra = {"TINKERKUBE_GATEWAY_POOL_MAX_INFLIGHT_SAMPLES": "1", "TINKERKUBE_GATEWAY_POOL_SAMPLE_QUEUE": "1",
             "TINKERKUBE_GATEWAY_LONG_POLL_SECONDS": "1", "FAKE_TRAINER_SAMPLE_DELAY": str(SAMPLE_SECONDS),
             "TINKERKUBE_GATEWAY_SEQ_GAP_TIMEOUT_SECONDS": "600"}
    gateway = start_gateway(tmp_path_factory.mktemp("futures") / "state", model_cache_dir=model_cache_dir,
                            extra_env=extra)
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def client(gw: GatewayProc) -> Iterator[tinker.ServiceClient]:
    with tinker.ServiceClient(base_url=gw.url, api_key=DEV_KEY) as service:
        yield service


@pytest.fixture(scope="module")
def sampler_id(client: tinker.ServiceClient, gw: GatewayProc) -> str:
    with gw.http() as http:
        reply = http.post("/api/v1/create_sampling_session", json={
            "session_id": client.holder.get_session_id(), "sampling_session_seq_id": 77, "base_model": TINY})
    return str(reply.json()["sampling_session_id"])


def _asample(http: httpx.Client, sampler: str, seq_id: int) -> httpx.Response:
    return http.post("/api/v1/asample", json={"sampling_session_id": sampler, "seq_id": seq_id, "num_samples": 1,
                                              "prompt": PROMPT, "sampling_params": {"max_tokens": 2}})


def _retrieve(http: httpx.Client, request_id: str) -> dict[str, Any]:
    return http.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()


def _settle(gw: GatewayProc, sampler: str) -> None:
    """Until the pool has nothing in flight (earlier tests' samples)."""
    deadline = time.monotonic() + 30
    while metric_value(gw, "tinkerkube_gateway_samples_inflight", tenant="local") > 0:
        assert time.monotonic() < deadline, "samples never finished"
        time.sleep(0.1)


def test_a_saturated_sampler_queues_then_answers_429_with_retry_after(gw: GatewayProc, sampler_id: str) -> None:
    _settle(gw, sampler_id)
    rejected_before = metric_value(gw, "tinkerkube_gateway_samples_rejected_total", reason="pool_queue_full",
                              tenant="local")
    with gw.http() as http:
        running = _asample(http, sampler_id, 1).json()["request_id"]
        waiting = _asample(http, sampler_id, 2).json()["request_id"]
        refused = _asample(http, sampler_id, 3)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.headers["x-should-retry"] == "true" and "saturated" in refused.json()["detail"]
        paused = _retrieve(http, waiting)
        assert paused["type"] == "try_again" and paused["queue_state"] == "paused_capacity"
        assert "queued" in paused["queue_state_reason"]
        assert metric_value(gw, "tinkerkube_gateway_samples_queued", reason="capacity", tenant="local") == 1
        again = _asample(http, sampler_id, 3)  # seq_id 3 was not used by the refusal
        while again.status_code == 429:
            time.sleep(0.2)
            again = _asample(http, sampler_id, 3)
        for request_id in (running, waiting, again.json()["request_id"]):
            answer = http.post("/api/v1/retrieve_future", json={"request_id": request_id})
            while answer.headers["content-type"].startswith("application/json"):
                assert answer.json()["type"] == "try_again", answer.text
                answer = http.post("/api/v1/retrieve_future", json={"request_id": request_id})
    assert metric_value(gw, "tinkerkube_gateway_samples_rejected_total", reason="pool_queue_full",
                   tenant="local") >= rejected_before + 1
    assert metric_value(gw, "tinkerkube_gateway_sampled_tokens_total", tenant="local") >= 6


def test_the_sdk_rides_out_backpressure_and_polls_with_retrieve_futures(gw: GatewayProc,
                                                                       client: tinker.ServiceClient) -> None:
    polls_before = metric_value(gw, "tinkerkube_gateway_requests_total", endpoint="/api/v1/retrieve_futures",
                           status="200")
    single_before = metric_value(gw, "tinkerkube_gateway_requests_total", endpoint="/api/v1/retrieve_future",
                            status="200")
    sampler = client.create_sampling_client(base_model=TINY)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(lambda: sampler.sample(types.ModelInput.from_ints([1, 2]), 1,
                                                    types.SamplingParams(max_tokens=2)).result()) for _ in range(4)]
        results = [c.result(timeout=120) for c in calls]
    assert all(len(r.sequences) == 1 for r in results)
    polls = metric_value(gw, "tinkerkube_gateway_requests_total", endpoint="/api/v1/retrieve_futures", status="200")
    singles = metric_value(gw, "tinkerkube_gateway_requests_total", endpoint="/api/v1/retrieve_future", status="200")
    assert polls > polls_before  # the client config's sample_use_retrieve_futures is in use
    assert singles - single_before == 4  # one payload fetch per sample, no per-sample long-polling
    assert metric_value(gw, "tinkerkube_gateway_requests_total", endpoint="/api/v1/asample", status="429") >= 1


def test_retrieve_futures_reports_each_completion_once_per_cursor(gw: GatewayProc, sampler_id: str) -> None:
    _settle(gw, sampler_id)
    target = {"type": "sampling_session", "sampling_session_id": sampler_id, "cloned_sampler_id": 0}
    with gw.http() as http:
        empty = http.post("/api/v1/retrieve_futures", json={"target": target, "prev_cursor": 0, "timeout": 0})
        cursor = empty.json()["cursor"]
        ids = [_asample(http, sampler_id, seq).json()["request_id"] for seq in (10, 11)]
        seen: dict[str, dict[str, Any]] = {}
        while len(seen) < 2:
            page = http.post("/api/v1/retrieve_futures", json={"target": target, "prev_cursor": cursor}).json()
            for completion in page["completions"]:
                assert completion["request_id"] not in seen  # never reported twice past the cursor
                seen[completion["request_id"]] = completion
            assert page["cursor"] >= cursor
            cursor = page["cursor"]
        assert set(seen) == set(ids)
        assert all(c["state"] == "finished" and c["response_payload_uncompressed_size"] > 0 for c in seen.values())
        clone = http.post("/api/v1/retrieve_futures", json={"target": {**target, "cloned_sampler_id": 5},
                                                             "prev_cursor": 0, "timeout": 0}).json()
        assert clone["completions"] == []  # another client copy's samples are its own
    with gw.http("tml-nobody") as stranger:
        assert stranger.post("/api/v1/retrieve_futures", json={"target": target}).status_code == 401


def test_cancelling_a_sample_fails_it_now_and_uses_its_seq_id(gw: GatewayProc, sampler_id: str) -> None:
    _settle(gw, sampler_id)
    with gw.http() as http:
        running = _asample(http, sampler_id, 20).json()["request_id"]
        queued = _asample(http, sampler_id, 21).json()["request_id"]
        on_trainer = http.post("/api/v1/cancel_future", json={"request_id": running}).json()
        in_queue = http.post("/api/v1/cancel_future", json={"request_id": queued}).json()
        assert on_trainer["cancelled"] and "stops it at its next decode step" in on_trainer["detail"]
        assert in_queue["cancelled"] and "never started" in in_queue["detail"]
        for request_id in (running, queued):
            failed = _retrieve(http, request_id)
            assert failed["category"] == "user" and "cancelled by the client" in failed["error"]
        reused = _asample(http, sampler_id, 21)
        assert reused.json()["request_id"] == queued  # the seq_id stays used by the cancelled sample
        done = http.post("/api/v1/cancel_future", json={"request_id": running}).json()
        assert not done["cancelled"] and done["state"] == "failed"
        assert http.post("/api/v1/cancel_future", json={"request_id": "req-nope"}).status_code == 404


def test_cancelling_a_training_op_before_it_reaches_the_trainer(gw: GatewayProc,
                                                               client: tinker.ServiceClient) -> None:
    training = client.create_lora_training_client(base_model=TINY, rank=4).result()
    model_id = training.model_id
    adam = {"learning_rate": 1e-3}
    with gw.http() as http:
        ahead = http.post("/api/v1/optim_step", json={"model_id": model_id, "seq_id": 3, "adam_params": adam})
        cancelled = http.post("/api/v1/cancel_future", json={"request_id": ahead.json()["request_id"]}).json()
        assert cancelled["cancelled"] and "never ran" in cancelled["detail"]
        for seq in (1, 2, 4):  # the hole before it fills; the op after it runs
            http.post("/api/v1/optim_step", json={"model_id": model_id, "seq_id": seq, "adam_params": adam})
        steps = []
        for seq in (1, 2, 4):
            fut = http.post("/api/v1/optim_step", json={"model_id": model_id, "seq_id": seq,
                                                         "adam_params": adam}).json()["request_id"]
            answer = _retrieve(http, fut)
            while answer.get("type") == "try_again":
                answer = _retrieve(http, fut)
            steps.append(answer["metrics"]["step:max"])
        assert steps == [1.0, 2.0, 3.0]  # the cancelled step never ran
        late = http.post("/api/v1/cancel_future", json={"request_id": fut}).json()
        assert not late["cancelled"] and late["state"] == "complete"


def test_the_client_configs_enable_what_is_served(gw: GatewayProc) -> None:
    with gw.http() as http:
        config = http.post("/api/v1/client/config", json={"sdk_version": "0.38.0"}).json()
        dynamic = http.post("/api/v1/client/dynamic_config", json={"sdk_version": "0.38.0"}).json()
    assert config["sample_use_retrieve_futures"] is True and config["sample_join_sampling_session"] is True
    assert config["pjwt_auth_enabled"] is True and config["custom_loss_server_side"] is True
    assert dynamic["sample_cancel_enabled"] is True
    assert types.ClientConfigResponse.model_validate(config).sample_use_retrieve_futures


def _until(check: Any, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_the_sdk_cancels_a_sample_it_abandons(gw: GatewayProc, client: tinker.ServiceClient) -> None:
    sampler = client.create_sampling_client(base_model=TINY)
    _settle(gw, "")
    asked = metric_value(gw, "tinkerkube_gateway_requests_total", endpoint="/api/v1/asample", status="200")
    cancels = metric_value(gw, "tinkerkube_gateway_requests_total", endpoint="/api/v1/cancel_future", status="200")
    failed = metric_value(gw, "tinkerkube_gateway_futures_total", op="sample", outcome="failed")
    pending = sampler.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2))
    _until(lambda: metric_value(gw, "tinkerkube_gateway_requests_total", endpoint="/api/v1/asample",
                           status="200") > asked, "the sample was never submitted")
    assert pending.future().cancel() or pending.future().cancelled()
    _until(lambda: metric_value(gw, "tinkerkube_gateway_requests_total", endpoint="/api/v1/cancel_future",
                           status="200") > cancels, "the SDK sent no cancel_future")
    assert metric_value(gw, "tinkerkube_gateway_futures_total", op="sample", outcome="failed") == failed + 1
