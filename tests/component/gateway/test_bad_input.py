"""Bad input gets a clear 4xx JSON error (never 402/409, never an empty 400) and changes no state."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.component.gateway.conftest import TINY
from tests.support.gateway_raw import fwdbwd_body, new_model, new_session, optim, post_fwdbwd, retrieve
from tests.support.sdk import GatewayProc


@pytest.fixture(scope="module")
def model(shared_gateway: GatewayProc) -> Iterator[tuple[httpx.Client, str]]:
    with shared_gateway.http() as http:
        yield http, new_model(http, new_session(http), TINY)


def _user_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["category"] == "user" and body["detail"]
    assert response.headers["x-should-retry"] == "false"
    return str(body["detail"])


def test_malformed_protobuf_is_a_400_with_a_body(model: tuple[httpx.Client, str]) -> None:
    http, _ = model
    assert "protobuf" in _user_error(post_fwdbwd(http, b"\xff\xff\xff not a protobuf"), 400)


def test_wrong_shapes_are_rejected_and_later_ops_still_run(model: tuple[httpx.Client, str]) -> None:
    http, model_id = model
    assert "first dimension" in _user_error(post_fwdbwd(http, fwdbwd_body(model_id, 1, n=4, targets=3)), 400)
    assert "unknown loss_fn" in _user_error(post_fwdbwd(http, fwdbwd_body(model_id, 2, loss_fn="nope")), 400)
    ok = post_fwdbwd(http, fwdbwd_body(model_id, 3))
    assert ok.status_code == 200
    result = retrieve(http, ok.json()["request_id"])
    assert result.headers["content-type"].startswith("application/x-protobuf")
    assert retrieve(http, optim(http, model_id, 4).json()["request_id"]).json() == {"metrics": {"step:max": 1}}


def test_retried_submit_returns_the_same_future_and_a_reused_seq_is_a_400(model: tuple[httpx.Client, str]) -> None:
    http, model_id = model
    body = fwdbwd_body(model_id, 5)
    first, again = post_fwdbwd(http, body), post_fwdbwd(http, body)
    assert first.json()["request_id"] == again.json()["request_id"]
    assert "already used" in _user_error(optim(http, model_id, 5), 400)
    retrieve(http, first.json()["request_id"])


def test_unknown_ids_are_404s(model: tuple[httpx.Client, str]) -> None:
    http, _ = model
    _user_error(http.post("/api/v1/get_info", json={"model_id": "sess-nope:train:0"}), 404)
    _user_error(http.post("/api/v1/retrieve_future", json={"request_id": "req-nope"}), 404)
    _user_error(optim(http, "sess-nope:train:0", 1), 404)
    _user_error(http.post("/api/v1/session_heartbeat", json={"session_id": "sess-nope"}), 404)


def test_path_tricks_in_checkpoint_names_change_nothing(model: tuple[httpx.Client, str]) -> None:
    http, model_id = model
    before = http.get(f"/api/v1/training_runs/{model_id}/checkpoints").json()
    for name in ("../evil", "a/b", ".hidden", "x\x00y"):
        response = http.post("/api/v1/save_weights", json={"model_id": model_id, "seq_id": 6, "path": name})
        assert "invalid checkpoint name" in _user_error(response, 400)
    _user_error(http.delete(f"/api/v1/training_runs/{model_id}/checkpoints/weights/..%2F..%2Fetc"), 400)
    assert http.get(f"/api/v1/training_runs/{model_id}/checkpoints").json() == before


def test_oversized_body_is_a_413(model: tuple[httpx.Client, str]) -> None:
    http, _ = model
    _user_error(post_fwdbwd(http, b"\x00" * 2_000_001), 413)


def test_missing_or_unknown_api_key_is_a_401_json(shared_gateway: GatewayProc) -> None:
    assert httpx.post(shared_gateway.url + "/api/v1/create_session", json={}).status_code == 401
    with shared_gateway.http("tml-unknown") as http:
        _user_error(http.post("/api/v1/create_session", json={}), 401)


def test_heartbeat_after_finish_is_410(shared_gateway: GatewayProc) -> None:
    with shared_gateway.http() as http:
        session_id = new_session(http)
        assert http.post("/api/v1/session_heartbeat", json={"session_id": session_id}).status_code == 200
        finish = http.post(f"/api/v1/sessions/{session_id}/finish", json={"reason": {"type": "success"}})
        assert finish.status_code == 200
        assert http.post("/api/v1/session_heartbeat", json={"session_id": session_id}).status_code == 410


@pytest.mark.parametrize("field,value", [("beta1", 1.5), ("learning_rate", -1.0), ("eps", 0.0)])
def test_out_of_range_adam_params_are_a_400_naming_the_field(model: tuple[httpx.Client, str], field: str,
                                                             value: float) -> None:
    http, model_id = model
    body = {"model_id": model_id, "seq_id": 100, "adam_params": {field: value}}
    assert field in _user_error(http.post("/api/v1/optim_step", json=body), 400)
