"""A shared sampler (one per tenant + weights, attached to a trainer pool) lives as long as any session
samples from it: it outlives the session that started it and detaches with its last user."""

from __future__ import annotations

import httpx

from tests.component.gateway.conftest import TINY
from tests.support.eventually import eventually_sync
from tests.support.gateway_raw import new_session, retrieve
from tests.support.sdk import GatewayProc


def _sampler(http: httpx.Client, session_id: str) -> str:
    response = http.post("/api/v1/create_sampling_session",
                         json={"session_id": session_id, "sampling_session_seq_id": 0, "base_model": TINY})
    assert response.status_code == 200, response.text
    return response.json()["sampling_session_id"]  # type: ignore[no-any-return]


def _sample(http: httpx.Client, sampler_id: str, seq_id: int) -> httpx.Response:
    response = http.post("/api/v1/asample", json={
        "sampling_session_id": sampler_id, "seq_id": seq_id, "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}, "sampling_params": {"max_tokens": 2}})
    assert response.status_code == 200, response.text
    return retrieve(http, response.json()["request_id"])


def _finish(http: httpx.Client, session_id: str) -> None:
    assert http.post(f"/api/v1/sessions/{session_id}/finish", json={"reason": {"type": "success"}}).is_success


def _sampler_processes(gw: GatewayProc) -> list[str]:
    return sorted(run for runs in gw.pools().values() for run in runs if ":sampler:" in run)


def test_a_shared_sampler_stops_with_its_last_user_not_its_first(gateway: GatewayProc) -> None:
    with gateway.http() as http:
        first, second = new_session(http), new_session(http)
        first_sampler, second_sampler = _sampler(http, first), _sampler(http, second)
        assert _sample(http, first_sampler, 0).headers["content-type"].startswith("application/x-protobuf")
        processes = _sampler_processes(gateway)
        assert len(processes) == 1  # one sampler for the tenant's base-model sampling, shared
        _finish(http, first)  # the session that started it
        assert _sample(http, second_sampler, 0).headers["content-type"].startswith("application/x-protobuf")
        assert _sampler_processes(gateway) == processes
        _finish(http, second)  # its last user
        eventually_sync(lambda: _sampler_processes(gateway), lambda names: names == [], timeout=15,
                        what="the shared sampler detached with its last user")
