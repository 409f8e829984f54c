"""The SDK's account families against a real gateway, with the real SDK, CLI and AdminClient: JWT exchange,
`tinker auth` key management, join_sampling_session (pickled SamplingClients), the audit log and usage."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types
from tinker.cli.auth_api import AuthApiError, TinkerAuthApi
from tinker.lib.credentials import (
    ApiKeyDetails,
    ApiKeyOrgDetails,
    ApiKeyUserDetails,
    GeneratedKey,
    JsonCredentialStore,
)

from tests.component.gateway.conftest import TINY
from tests.support.sdk import GatewayProc, metric_value, start_gateway

KEYS = {"tml-alice": "alice", "tml-alice-2": "alice", "tml-bob": "bob"}
PROMPT = [5, 6, 7]
MAX_TOKENS = 3


def _start(state: Path, model_cache_dir: Path) -> GatewayProc:
    return start_gateway(state, model_cache_dir=model_cache_dir,
                         extra_env={"TINKERKUBE_GATEWAY_API_KEYS": json.dumps(KEYS)})


@pytest.fixture(scope="module")
def account_gateway(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path) -> Iterator[GatewayProc]:
    gw = _start(tmp_path_factory.mktemp("gw-account") / "state", model_cache_dir)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def alice_work(account_gateway: GatewayProc) -> dict[str, object]:
    """Alice trains (two datums of 4 and 6 tokens), saves for sampling and samples, through the SDK, which
    the gateway's client config has exchange its key for JWTs."""
    client = tinker.ServiceClient(base_url=account_gateway.url, api_key="tml-alice")
    training = client.create_lora_training_client(base_model=TINY, rank=4).result()
    data = [types.Datum(model_input=types.ModelInput.from_ints(list(range(1, n + 1))),
                        loss_fn_inputs={"target_tokens": list(range(2, n + 2)), "weights": [1.0] * n})
            for n in (4, 6)]
    training.forward_backward(data, "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-4)).result()
    path = training.save_weights_for_sampler("s1").result().path
    sampler = client.create_sampling_client(model_path=path).result()
    params = types.SamplingParams(max_tokens=MAX_TOKENS)
    response = sampler.sample(types.ModelInput.from_ints(PROMPT), 2, params).result()
    assert len(response.sequences) == 2
    return {"client": client, "training": training, "path": path, "sampler": sampler}


# --- auth/token ------------------------------------------------------------------------------------------
def test_the_sdk_exchanges_its_key_for_a_jwt_that_the_gateway_takes(account_gateway: GatewayProc,
                                                                     alice_work: dict[str, object]) -> None:
    assert metric_value(account_gateway, "tinkerkube_gateway_auth_tokens_issued_total", tenant="alice") >= 1
    with httpx.Client(base_url=account_gateway.url) as http:
        config = http.post("/api/v1/client/config", headers={"X-API-Key": "tml-alice"}, json={}).json()
        assert config["pjwt_auth_enabled"] is True and config["sample_join_sampling_session"] is True
        jwt = types.AuthTokenResponse.model_validate(
            http.post("/api/v1/auth/token", headers={"X-API-Key": "tml-alice"}, json={}).json()).jwt
        runs = http.get("/api/v1/training_runs", headers={"X-API-Key": jwt})
        assert runs.status_code == 200
        assert [r["training_run_id"] for r in runs.json()["training_runs"]] == [
            alice_work["training"].model_id]  # type: ignore[attr-defined]
        again = http.post("/api/v1/auth/token", headers={"X-API-Key": jwt}, json={})  # a JWT renews itself
        assert again.status_code == 200 and again.json()["jwt"].startswith("eyJ")
        head, body, sig = jwt.split(".")
        for forged in [f"{head}.{body}.{sig[:-2]}AA", f"{head}.{body[:-2]}xx.{sig}", "eyJ.not.ajwt", "eyJ"]:
            refused = http.get("/api/v1/training_runs", headers={"X-API-Key": forged})
            assert refused.status_code == 401, forged
            assert refused.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        assert http.post("/api/v1/auth/token", headers={"X-API-Key": "tml-nobody"}, json={}).status_code == 401
        assert http.post("/api/v1/auth/token", json={}).status_code == 401
        bob = http.get("/api/v1/training_runs", headers={"X-API-Key": http.post(
            "/api/v1/auth/token", headers={"X-API-Key": "tml-bob"}, json={}).json()["jwt"]})
        assert bob.status_code == 200 and bob.json()["training_runs"] == []  # a JWT is its own tenant's


# --- join_sampling_session -------------------------------------------------------------------------------
def test_unpickled_sampling_clients_join_with_distinct_clone_ids_and_all_sample(account_gateway: GatewayProc,
                                                                                 alice_work: dict[str, object]) -> None:
    sampler: tinker.SamplingClient = alice_work["sampler"]  # type: ignore[assignment]
    clones = [pickle.loads(pickle.dumps(sampler)) for _ in range(2)]
    prompt = types.ModelInput.from_ints(PROMPT)
    params = types.SamplingParams(max_tokens=MAX_TOKENS)
    futures = [c.sample(prompt, 1, params) for c in [sampler, *clones, *clones]]  # clones twice: seq ids go on
    assert all(len(f.result().sequences) == 1 for f in futures)
    with httpx.Client(base_url=account_gateway.url, headers={"X-API-Key": "tml-alice"}) as http:
        sampling_session_id = sampler._sampling_session_id  # what the SDK joins (no public accessor)
        joined = http.post("/api/v1/join_sampling_session", json={"sampling_session_id": sampling_session_id})
        assert types.JoinSamplingSessionResponse.model_validate(joined.json()).client_counter == 3  # 1, 2 taken
        bad = [({"sampling_session_id": "nope:sample:0"}, 404), ({"sampling_session_id": ""}, 400), ({}, 400)]
        for body, status in bad:
            assert http.post("/api/v1/join_sampling_session", json=body).status_code == status
        assert http.post("/api/v1/join_sampling_session", headers={"X-API-Key": "tml-bob"},
                         json={"sampling_session_id": sampling_session_id}).status_code == 404  # not bob's


@pytest.mark.slow
def test_clone_ids_survive_a_gateway_restart(tmp_path: Path, model_cache_dir: Path) -> None:
    state = tmp_path / "state"
    gw = _start(state, model_cache_dir)
    try:
        client = tinker.ServiceClient(base_url=gw.url, api_key="tml-bob")
        sampler = client.create_sampling_client(base_model=TINY).result()
        first = pickle.loads(pickle.dumps(sampler))
        assert first.sample(types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=2)).result()
        sampler_id = sampler._sampling_session_id
    finally:
        gw.stop()
    gw2 = _start(state, model_cache_dir)
    try:
        with httpx.Client(base_url=gw2.url, headers={"X-API-Key": "tml-bob"}) as http:
            joined = http.post("/api/v1/join_sampling_session", json={"sampling_session_id": sampler_id})
        assert joined.json()["client_counter"] == 2  # the clone before the restart had 1
    finally:
        gw2.stop()


# --- billing ----------------------------------------------------------------------------------------------
def _window() -> tuple[datetime, datetime]:
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return hour - timedelta(hours=1), hour + timedelta(hours=1)


def test_usage_events_count_what_alice_trained_sampled_and_saved(account_gateway: GatewayProc,
                                                                  alice_work: dict[str, object]) -> None:
    admin = tinker.AdminClient(base_url=account_gateway.url, api_key="tml-alice")
    start, end = _window()
    usage = admin.get_billing_usage(start, end).result()
    totals: dict[str, float] = {}
    for event in usage.data:
        info = event.event_info
        amount = getattr(info, "token_count", None) or getattr(info, "count", None) or info.gigabyte_hours  # type: ignore[union-attr]
        totals[info.type] = totals.get(info.type, 0) + amount
        assert start <= event.bucket_start < end and event.user_id == "alice"
    assert totals["training"] == 4 + 6
    assert totals["sampling_prefill"] >= len(PROMPT) and totals["sampling_prefill"] % len(PROMPT) == 0
    assert totals["sampling_sample"] >= 2 * MAX_TOKENS  # the fake trainer generates max_tokens per sequence
    assert totals["checkpoint"] == 1 and totals["storage"] > 0
    training = alice_work["training"]
    assert {e.base_model for e in usage.data if e.event_info.type == "training"} == {TINY}
    assert {e.session_id for e in usage.data if e.event_info.type == "training"} == {
        training.model_id.split(":train:")[0]}  # type: ignore[attr-defined]
    assert set(usage.sessions) == {e.session_id for e in usage.data if e.session_id}
    bob = tinker.AdminClient(base_url=account_gateway.url, api_key="tml-bob").get_billing_usage(start, end).result()
    assert bob.data == []  # a tenant's own usage only
    storage = admin.get_current_checkpoint_storage_usage().result()
    rest = alice_work["client"].create_rest_client()  # type: ignore[attr-defined]
    listed = rest.list_user_checkpoints().result().checkpoints
    assert [(i.project_id, i.checkpoint_count, i.size_bytes) for i in storage.data] == [
        ("default", len(listed), sum(c.size_bytes or 0 for c in listed))]
    assert admin.get_current_checkpoint_storage_usage(project_id="elsewhere").result().data == []


def test_the_tinker_billing_cli_reports_the_same_usage(account_gateway: GatewayProc,
                                                       alice_work: dict[str, object]) -> None:
    start, end = _window()
    env = {**os.environ, "TINKER_API_KEY": "tml-alice", "TINKER_BASE_URL": account_gateway.url}
    cli = [sys.executable, "-m", "tinker.cli", "--format", "json", "billing"]
    usage = subprocess.run([*cli, "usage", start.isoformat(), end.isoformat()], env=env, capture_output=True,
                           text=True, timeout=120)
    assert usage.returncode == 0, usage.stderr
    rows = json.loads(usage.stdout)["data"]
    assert sum(r["event_info"]["token_count"] for r in rows if r["event_info"]["type"] == "training") == 4 + 6
    storage = subprocess.run([*cli, "checkpoint-storage"], env=env, capture_output=True, text=True, timeout=120)
    assert storage.returncode == 0, storage.stderr
    assert [r["project_id"] for r in json.loads(storage.stdout)["data"]] == ["default"]


def test_bad_usage_windows_and_parameters_are_400s(account_gateway: GatewayProc) -> None:
    start, _ = _window()
    iso = start.isoformat()
    bad = [{}, {"starting_on": iso}, {"starting_on": "yesterday", "ending_before": iso},
           {"starting_on": iso, "ending_before": (start + timedelta(minutes=30)).isoformat()},
           {"starting_on": iso, "ending_before": iso},
           {"starting_on": iso, "ending_before": (start + timedelta(days=15)).isoformat()},
           {"starting_on": (start + timedelta(days=2)).isoformat(),
            "ending_before": (start + timedelta(days=3)).isoformat()},
           {"starting_on": "9999-12-31T23:00:00Z", "ending_before": "9999-12-31T23:00:00Z"},
           {"starting_on": "0001-01-01T00:00:00", "ending_before": "0001-01-01T01:00:00+23:00"}]
    with httpx.Client(base_url=account_gateway.url, headers={"X-API-Key": "tml-alice"}) as http:
        for params in bad:
            assert http.get("/api/v1/billing/usage/events", params=params).status_code == 400, params
        assert http.get("/api/v1/billing/usage/checkpoints/current", params={"project_id": ""}).status_code == 400
        assert http.get("/api/v1/billing/usage/checkpoints/current",
                        params={"project_id": "p" * 201}).status_code == 400
        assert http.get("/api/v1/billing/usage/events", headers={"X-API-Key": "tml-nobody"},
                        params={"starting_on": iso, "ending_before": iso}).status_code == 401


# --- audit ------------------------------------------------------------------------------------------------
def test_the_audit_log_records_alices_changes_for_her_only(account_gateway: GatewayProc,
                                                          alice_work: dict[str, object]) -> None:
    rest = alice_work["client"].create_rest_client()  # type: ignore[attr-defined]
    path = str(alice_work["path"])
    rest.publish_checkpoint_from_tinker_path(path).result()
    rest.unpublish_checkpoint_from_tinker_path(path).result()
    rest.delete_checkpoint_from_tinker_path(path).result()
    admin = tinker.AdminClient(base_url=account_gateway.url, api_key="tml-alice")
    events = [e.event for e in admin.get_audit_log().result().entries]
    for expected in ["session_create", "model_create", "sampler_create", "checkpoint_publish",
                     "checkpoint_unpublish", "checkpoint_delete"]:
        assert expected in events
    assert events.index("checkpoint_publish") < events.index("checkpoint_unpublish") < events.index(
        "checkpoint_delete")  # oldest first
    checkpoints = admin.get_audit_log(event_type="checkpoints").result().entries
    assert [e.event for e in checkpoints] == ["checkpoint_publish", "checkpoint_unpublish", "checkpoint_delete"]
    assert {e.tinker_path for e in checkpoints} == {path}
    assert all("actor_key_id" in e.event_details for e in checkpoints)
    assert admin.get_audit_log(event_type="teams").result().entries == []
    assert admin.get_audit_log(day=date(2001, 1, 1)).result().entries == []
    bob = tinker.AdminClient(base_url=account_gateway.url, api_key="tml-bob").get_audit_log().result()
    assert all(e.event_details.get("tinker_path") != path for e in bob.entries)
    with httpx.Client(base_url=account_gateway.url, headers={"X-API-Key": "tml-alice"}) as http:
        for params in [{"day": "2026-13-45"}, {"day": "today"}, {"event_type": "everything"}, {"day": "9" * 30}]:
            assert http.get("/api/v1/audit", params=params).status_code == 400, params
        assert http.get("/api/v1/audit", params={"day": "9999-12-31"}).json() == {"entries": []}


def test_a_retried_create_is_one_audit_entry(account_gateway: GatewayProc) -> None:
    """The SDK retries a create whose answer was lost: the same run / sampler, and one audit entry each."""
    with httpx.Client(base_url=account_gateway.url, headers={"X-API-Key": "tml-bob"}, timeout=60) as http:
        session_id = http.post("/api/v1/create_session", json={}).json()["session_id"]
        create = {"session_id": session_id, "model_seq_id": 0, "base_model": TINY, "lora_config": {"rank": 4},
                  "type": "create_model"}
        sampler = {"session_id": session_id, "sampling_session_seq_id": 0, "base_model": TINY,
                   "type": "create_sampling_session"}
        first, again = (http.post("/api/v1/create_model", json=create).json() for _ in range(2))
        assert first["request_id"] == again["request_id"]
        sampler_ids = {http.post("/api/v1/create_sampling_session", json=sampler).json()["sampling_session_id"]
                       for _ in range(2)}
        assert len(sampler_ids) == 1
        entries = http.get("/api/v1/audit").json()["entries"]
    mine = [e["event"] for e in entries if session_id in json.dumps(e["event_details"])]
    assert sorted(mine) == ["model_create", "sampler_create", "session_create"]


# --- auth/apikey/me ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tinker_auth_describes_and_revokes_the_calling_key_durably(tmp_path: Path, model_cache_dir: Path) -> None:
    state = tmp_path / "state"
    gw = _start(state, model_cache_dir)
    try:
        with httpx.Client(timeout=30) as http:
            api = TinkerAuthApi(http, base_url=gw.url)  # what `tinker auth login` verifies a key with
            me = api.get_self_api_key("tml-alice")
            other = api.get_self_api_key("tml-alice-2")
            assert me.details.org_details.name == "alice" and me.key_id != other.key_id
            with pytest.raises(AuthApiError, match="401"):
                api.get_self_api_key("tml-nobody")
        jwt = httpx.post(gw.url + "/api/v1/auth/token", headers={"X-API-Key": "tml-alice"}, json={}).json()["jwt"]
        # `tinker auth logout` deletes a key the CLI minted itself on the server: store one as such.
        home = tmp_path / "home"
        store = JsonCredentialStore(home / ".tinker" / "credentials.json")
        details = ApiKeyDetails(org_details=ApiKeyOrgDetails(name="alice"), user_details=ApiKeyUserDetails(email="a"))
        store.add_key(str(me.key_id), GeneratedKey(key="tml-alice", name=me.name, details=details))
        store.set_default(str(me.key_id))
        env = {**os.environ, "HOME": str(home), "TINKER_BASE_URL": gw.url}
        logout = subprocess.run([sys.executable, "-m", "tinker.cli", "auth", "logout"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert logout.returncode == 0, logout.stderr
        assert "deleted its API key on the server" in logout.stdout
        _assert_revoked(gw, jwt)
        assert "api_key_revoke" in [e.event for e in tinker.AdminClient(
            base_url=gw.url, api_key="tml-alice-2").get_audit_log(event_type="organizations").result().entries]
        assert metric_value(gw, "tinkerkube_gateway_api_keys_revoked_total", tenant="alice") == 1
    finally:
        gw.stop()
    gw2 = _start(state, model_cache_dir)  # the revocation is in the store, not in the process
    try:
        _assert_revoked(gw2, jwt)
    finally:
        gw2.stop()


def _assert_revoked(gw: GatewayProc, jwt: str) -> None:
    with httpx.Client(base_url=gw.url) as http:
        for credential in ["tml-alice", jwt]:
            assert http.get("/api/v1/training_runs", headers={"X-API-Key": credential}).status_code == 401
        assert http.delete("/api/v1/auth/apikey/me", headers={"X-API-Key": "tml-alice"}).status_code == 401
        assert http.get("/api/v1/auth/apikey/me", headers={"X-API-Key": "tml-alice-2"}).status_code == 200
    with pytest.raises(tinker.AuthenticationError):
        tinker.ServiceClient(base_url=gw.url, api_key="tml-alice").get_server_capabilities()
