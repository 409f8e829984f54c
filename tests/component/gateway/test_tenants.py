"""A tenant sees and touches only its own sessions, runs, futures and checkpoints (others' → 404)."""

from __future__ import annotations

from tests.component.gateway.conftest import TINY
from tests.support.gateway_raw import new_model, new_session, optim, result_json
from tests.support.sdk import GatewayProc


def test_other_tenants_resources_are_invisible(shared_gateway: GatewayProc) -> None:
    with shared_gateway.http("tml-alice") as alice, shared_gateway.http("tml-bob") as bob:
        session_id = new_session(alice)
        model_id = new_model(alice, session_id, TINY)
        saved = alice.post("/api/v1/save_weights", json={"model_id": model_id, "seq_id": 1, "path": "s1"})
        path = result_json(alice, saved.json()["request_id"])["path"]
        assert bob.post("/api/v1/get_info", json={"model_id": model_id}).status_code == 404
        assert bob.post("/api/v1/retrieve_future", json={"request_id": saved.json()["request_id"]}).status_code == 404
        assert optim(bob, model_id, 2).status_code == 404
        assert bob.get(f"/api/v1/training_runs/{model_id}").status_code == 404
        assert bob.delete(f"/api/v1/training_runs/{model_id}/checkpoints/weights/s1").status_code == 404
        assert bob.post("/api/v1/weights_info", json={"tinker_path": path}).status_code == 404
        assert bob.get(f"/api/v1/sessions/{session_id}").status_code == 404
        assert bob.post("/api/v1/session_heartbeat", json={"session_id": session_id}).status_code == 404
        assert session_id not in bob.get("/api/v1/sessions").json()["sessions"]
        assert all(c["tinker_path"] != path for c in bob.get("/api/v1/checkpoints").json()["checkpoints"])
        assert alice.get(f"/api/v1/training_runs/{model_id}").status_code == 200
        # publishing makes a checkpoint readable (not writable) by others
        assert alice.post(f"/api/v1/training_runs/{model_id}/checkpoints/weights/s1/publish").status_code == 200
        assert bob.post("/api/v1/weights_info", json={"tinker_path": path}).json()["base_model"] == TINY
        assert bob.delete(f"/api/v1/training_runs/{model_id}/checkpoints/weights/s1").status_code == 404
        assert alice.delete(f"/api/v1/training_runs/{model_id}/checkpoints/weights/s1/publish").status_code == 200
        assert bob.post("/api/v1/weights_info", json={"tinker_path": path}).status_code == 404
