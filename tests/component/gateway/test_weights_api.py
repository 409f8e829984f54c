"""External weights, signed downloads, copy_weights, load_weights' options, model-name variants and the
per-run checkpoint count, with the real SDK against a gateway on fake trainers (shapes and rules; the real
files are checked in tests/component/cookbook/test_weight_download.py)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

import pyrage
import pytest
import tinker
from tinker import types

from tests.component.gateway.conftest import TINY
from tests.support.sdk import GatewayProc, start_gateway

ALICE, BOB = "tml-alice", "tml-bob"
KEYS = '{"tml-alice": "alice", "tml-bob": "bob", "tml-local": "local"}'


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path) -> Iterator[GatewayProc]:
    gateway = start_gateway(tmp_path_factory.mktemp("weights") / "state", model_cache_dir=model_cache_dir,
                            extra_env={"TINKERKUBE_GATEWAY_API_KEYS": KEYS})
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def alice(gw: GatewayProc) -> Iterator[tinker.ServiceClient]:
    with tinker.ServiceClient(base_url=gw.url, api_key=ALICE) as client:
        yield client


@pytest.fixture(scope="module")
def bob(gw: GatewayProc) -> Iterator[tinker.ServiceClient]:
    with tinker.ServiceClient(base_url=gw.url, api_key=BOB) as client:
        yield client


@pytest.fixture(scope="module")
def alice_run(alice: tinker.ServiceClient) -> tinker.TrainingClient:
    return alice.create_lora_training_client(base_model=TINY, rank=4).result()


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return bytes(response.read())


def _status(url: str) -> int:
    try:
        _fetch(url)
        return 200
    except urllib.error.HTTPError as exc:
        return exc.code


def _rest(gw: GatewayProc, key: str) -> tinker.RestClient:
    return tinker.RestClient(base_url=gw.url, api_key=key)


def test_an_export_downloads_through_signed_urls_plain_and_encrypted(gw: GatewayProc,
                                                                     alice_run: tinker.TrainingClient) -> None:
    plain = alice_run.save_weights_external("plain").result().path
    assert plain == f"tinker://{alice_run.model_id}/external_weights/plain"
    urls = _rest(gw, ALICE).get_external_weights_urls(plain).result()
    assert sorted(urls.urls) == ["adapter_config.json", "adapter_model.safetensors"]
    assert urls.urls["adapter_model.safetensors"].startswith(gw.url + "/downloads/")
    assert b"weights of" in _fetch(urls.urls["adapter_model.safetensors"])

    identity = pyrage.x25519.Identity.generate()
    sealed = alice_run.save_weights_external("sealed", ttl_seconds=7200,
                                             age_encryption_recipients=[str(identity.to_public())]).result().path
    urls = _rest(gw, ALICE).get_external_weights_urls(sealed).result()
    assert sorted(urls.urls) == ["adapter_config.json.age", "adapter_model.safetensors.age"]
    content = _fetch(urls.urls["adapter_config.json.age"])
    assert b'"r": 4' not in content and pyrage.decrypt(content, [identity]) == b'{"r": 4}'
    listed = {c.tinker_path: c for c in _rest(gw, ALICE).list_checkpoints(alice_run.model_id).result().checkpoints}
    assert listed[sealed].checkpoint_type == "external" and listed[sealed].expires_at is not None
    assert listed[sealed].size_bytes == sum(len(_fetch(u)) for u in urls.urls.values())


def test_download_urls_are_checked_tenant_signature_and_lifetime(gw: GatewayProc,
                                                                  alice_run: tinker.TrainingClient) -> None:
    path = alice_run.save_weights_external("guarded").result().path
    alice_rest, bob_rest = _rest(gw, ALICE), _rest(gw, BOB)
    with pytest.raises(tinker.NotFoundError):
        bob_rest.get_external_weights_urls(path).result()
    url = alice_rest.get_external_weights_urls(path).result().urls["adapter_config.json"]
    parts = urlparse(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    forged = {**query, "expires": str(int(query["expires"]) + 10**6)}
    assert _status(url) == 200
    assert _status(url.replace(parts.query, urlencode(forged))) == 403  # a later expiry breaks the signature
    assert _status(url.replace("adapter_config.json?", "adapter_model.safetensors?")) == 403  # signed per file
    assert _status(url.replace("/owner/", "/public/")) == 403  # not published
    with gw.http(ALICE) as http:  # (the SDK refuses to ask for these itself)
        other_kind = http.get(f"/api/v1/training_runs/{alice_run.model_id}/checkpoints/weights/guarded/"
                              "external_weights_urls")
    assert other_kind.status_code == 404 and "only those are downloaded" in other_kind.json()["detail"]
    # published: anyone may sign; unpublished again: their URL stops at once
    alice_rest.publish_checkpoint_from_tinker_path(path).result()
    bobs = bob_rest.get_external_weights_urls(path).result().urls["adapter_config.json"]
    assert "/public/" in bobs and _status(bobs) == 200
    alice_rest.unpublish_checkpoint_from_tinker_path(path).result()
    assert _status(bobs) == 403
    alice_rest.delete_checkpoint_from_tinker_path(path).result()
    assert _status(url) == 404


def test_a_bad_recipient_uses_its_seq_id_and_the_run_goes_on(alice_run: tinker.TrainingClient) -> None:
    with pytest.raises(tinker.BadRequestError, match="age_encryption_recipients"):
        alice_run.save_weights_external("bad", age_encryption_recipients=["age1notakey"]).result()
    with pytest.raises(tinker.BadRequestError, match="invalid checkpoint name"):
        alice_run.save_weights_external("../escape").result()
    assert alice_run.save_weights_external("after").result().path.endswith("/external_weights/after")


def test_copy_weights_into_a_project_and_into_a_session_slot(gw: GatewayProc, alice: tinker.ServiceClient,
                                                            alice_run: tinker.TrainingClient) -> None:
    source = alice_run.save_state("to-copy").result().path
    rest = _rest(gw, ALICE)
    copied = rest.copy_weights(source, "archive", ttl_seconds=3600).result()
    assert copied.endswith("/weights/to-copy") and copied != source
    run_id = copied.removeprefix("tinker://").split("/")[0]
    run = rest.get_training_run(run_id).result()
    assert run.base_model == TINY and run.last_checkpoint is not None
    assert run.last_checkpoint.tinker_path == copied and run.last_checkpoint.expires_at is not None
    copy_dir = Path(gw.state_dir, "checkpoints", run_id, "weights", "to-copy")
    source_dir = Path(gw.state_dir, "checkpoints", alice_run.model_id, "weights", "to-copy")
    assert {p.name for p in copy_dir.iterdir()} == {p.name for p in source_dir.iterdir()}
    assert all((copy_dir / p.name).stat().st_ino == p.stat().st_ino for p in source_dir.iterdir())  # shared bytes
    session = run_id.split(":train:")[0]
    found = rest.search_sessions(types.SessionSearchRequest(session_id=session)).result().sessions
    assert [(s.project_id, s.status) for s in found] == [("archive", None)]
    # the copy can be trained from, never trained itself
    resumed = alice.create_training_client_from_state(copied).result()
    assert resumed.get_info().model_data.model_name == TINY
    # a copy into a slot of this session; the slot is then used
    session_id = alice.holder.get_session_id()
    request = types.CopyWeightsRequest(source_path=source, session_id=session_id, model_seq_id=50)
    with gw.http(ALICE) as http:
        first = http.post("/api/v1/copy_weights", json=request.model_dump(exclude_none=True))
        again = http.post("/api/v1/copy_weights", json=request.model_dump(exclude_none=True))
        taken = http.post("/api/v1/copy_weights", json={**request.model_dump(exclude_none=True),
                                                        "source_path": copied})
    assert first.status_code == 200 and first.json() == again.json()  # a retry of the same copy
    assert first.json()["tinker_path"] == f"tinker://{session_id}:train:50/weights/to-copy"
    assert taken.status_code == 400 and "already exists" in taken.json()["detail"]


def test_weights_access_tokens_open_another_tenants_checkpoints(gw: GatewayProc, bob: tinker.ServiceClient,
                                                               alice_run: tinker.TrainingClient) -> None:
    state = alice_run.save_state("shared").result().path
    with pytest.raises(tinker.NotFoundError):
        bob.create_training_client_from_state(state).result()
    with pytest.raises(tinker.PermissionDeniedError, match="not an API key"):
        bob.create_training_client_from_state(state, weights_access_token="tml-nobody").result()
    loaded = bob.create_training_client_from_state_with_optimizer(state, weights_access_token=ALICE).result()
    assert loaded.model_id.startswith(bob.holder.get_session_id())
    assert _rest(gw, BOB).copy_weights(state, "bobs", weights_access_token=ALICE).result().startswith("tinker://")
    with pytest.raises(tinker.NotFoundError):
        _rest(gw, BOB).copy_weights(state, "bobs").result()


def test_load_weights_base_model_override_and_optimizer_rules(gw: GatewayProc, alice: tinker.ServiceClient,
                                                             alice_run: tinker.TrainingClient) -> None:
    state = alice_run.save_state("opts").result().path
    sampler = alice_run.save_weights_for_sampler("opts-sampler").result().path
    variant = alice.create_training_client_from_state(state, base_model=f"{TINY}:peft:262144").result()
    assert variant.get_info().model_data.model_name == TINY
    with pytest.raises(tinker.BadRequestError, match="may only name a variant"):
        alice.create_training_client_from_state(state, base_model="HuggingFaceTB/SmolLM2-135M-Instruct").result()
    with pytest.raises(tinker.BadRequestError, match="holds no optimizer state"):
        alice.create_training_client_from_state_with_optimizer(sampler).result()
    dimuon = alice.create_training_client_from_state(state, optimizer=types.DimuonOptimizerConfig()).result()
    assert dimuon.get_info().optimizer_config.type == "dimuon"  # weights only: the optimizer is the caller's
    resumed = alice.create_training_client_from_state_with_optimizer(state).result()
    assert resumed.get_info().optimizer_config.type == "adamw"  # with its state: the checkpoint's optimizer
    with gw.http(ALICE) as http:
        body = {"session_id": alice.holder.get_session_id(), "model_seq_id": 90, "path": state, "optimizer": True,
                "optimizer_config": {"type": "adamw"}, "type": "load_weights"}
        refused = http.post("/api/v1/load_weights", json=body)
        external = http.post("/api/v1/load_weights", json={
            **body, "optimizer": False, "optimizer_config": None,
            "path": alice_run.save_weights_external("not-loadable").result().path})
    assert refused.status_code == 400 and "optimizer_config cannot replace" in refused.json()["detail"]
    assert external.status_code == 400 and "for download only" in external.json()["detail"]


def test_a_variant_model_name_runs_on_its_base_models_pool(gw: GatewayProc, alice: tinker.ServiceClient,
                                                           alice_run: tinker.TrainingClient) -> None:
    variant = alice.create_lora_training_client(base_model=f"{TINY}:peft:262144", rank=4).result()
    assert variant.get_info().model_data.model_name == TINY
    pools = [runs for runs in gw.pools().values() if variant.model_id in runs]
    assert len(pools) == 1 and alice_run.model_id in pools[0]
    sampler = alice.create_sampling_client(base_model=f"{TINY}:peft:32768")
    assert len(sampler.sample(types.ModelInput.from_ints([1, 2]), 1,
                              types.SamplingParams(max_tokens=2)).result().sequences) == 1


def test_a_runs_checkpoint_list_counts_every_checkpoint(gw: GatewayProc, alice: tinker.ServiceClient) -> None:
    run = alice.create_lora_training_client(base_model=TINY, rank=4).result()
    for name in ("a", "b", "c"):
        run.save_state(name).result()
    with gw.http(ALICE) as http:
        page = http.get(f"/api/v1/training_runs/{run.model_id}/checkpoints", params={"limit": 2}).json()
    assert len(page["checkpoints"]) == 2 and page["cursor"]["total_count"] == 3
