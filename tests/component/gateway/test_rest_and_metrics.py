"""REST extras (TTL expiry, sessions, healthz, docs) and the Prometheus metrics."""

from __future__ import annotations

from tests.component.gateway.conftest import TINY
from tests.support.eventually import eventually_sync
from tests.support.gateway_raw import fwdbwd_body, new_model, new_session, post_fwdbwd, result_json, retrieve
from tests.support.sdk import GatewayProc


def test_a_checkpoint_with_a_ttl_expires_and_its_files_go(shared_gateway: GatewayProc) -> None:
    with shared_gateway.http() as http:
        model_id = new_model(http, new_session(http), TINY)
        saved = http.post("/api/v1/save_weights", json={"model_id": model_id, "seq_id": 1, "path": "short"})
        path = result_json(http, saved.json()["request_id"])["path"]
        directory = shared_gateway.state_dir / "checkpoints" / model_id / "weights" / "short"
        assert directory.is_dir()
        ttl = http.put(f"/api/v1/training_runs/{model_id}/checkpoints/weights/short/ttl", json={"ttl_seconds": 1})
        assert ttl.status_code == 200
        listed = http.get(f"/api/v1/training_runs/{model_id}/checkpoints").json()["checkpoints"]
        assert listed[0]["tinker_path"] == path and listed[0]["expires_at"]
        eventually_sync(lambda: http.get(f"/api/v1/training_runs/{model_id}/checkpoints").json()["checkpoints"],
                        lambda c: c == [], timeout=15, what="checkpoint expired")
        assert not directory.exists()


def test_sessions_list_and_describe_their_runs(shared_gateway: GatewayProc) -> None:
    with shared_gateway.http() as http:
        session_id = new_session(http)
        model_id = new_model(http, session_id, TINY)
        assert session_id in http.get("/api/v1/sessions").json()["sessions"]
        described = http.get(f"/api/v1/sessions/{session_id}").json()
        assert described["training_run_ids"] == [model_id] and described["sampler_ids"] == []


def test_healthz_and_docs_need_no_key(shared_gateway: GatewayProc) -> None:
    with shared_gateway.http(key="") as http:
        assert http.get("/api/v1/healthz").json() == {"status": "ok"}
        assert http.get("/docs").status_code == 200
        paths = http.get("/openapi.json").json()["paths"]
    assert paths["/api/v1/forward_backward"]["post"]["summary"]


def test_metrics_count_requests_and_futures(shared_gateway: GatewayProc) -> None:
    with shared_gateway.http() as http:
        model_id = new_model(http, new_session(http), TINY)
        retrieve(http, post_fwdbwd(http, fwdbwd_body(model_id, 1)).json()["request_id"])
        # The result is handed to its waiters before the store write that counts it (futures._finish).
        text = eventually_sync(lambda: http.get("/metrics").text,
                               lambda t: 'futures_total{op="forward_backward",outcome="complete"}' in t,
                               timeout=30, what="the finished forward_backward counted")
    for name in ("tinkerkube_gateway_requests_total", "tinkerkube_gateway_request_seconds",
                 "tinkerkube_gateway_future_seconds", "tinkerkube_gateway_queue_depth",
                 "tinkerkube_gateway_active_sessions", "tinkerkube_gateway_futures_total"):
        assert name in text
    assert 'tinkerkube_gateway_futures_total{op="forward_backward",outcome="complete"}' in text
    assert 'endpoint="/api/v1/forward_backward",status="200"' in text
