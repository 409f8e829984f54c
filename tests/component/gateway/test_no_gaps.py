"""No gaps, no hangs (issue 9): every refused request that names a training op still uses its seq_id, a
seq_id that never arrives is sealed after the gap timeout, one far ahead is refused, and the run's next
steps equal those of a twin that never saw the bad request.

Raw HTTP for exact statuses (the SDK hides them behind retries), and the real SDK for what a user meets,
against one gateway with short limits and fake trainers: these checks are about ordering, not math
(test_bad_input_twin.py has the real-trainer twin). The fake trainer's logprobs move with every optim
step it applies, so equal results mean equal steps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
import zstandard
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

from tests.component.gateway.conftest import TINY
from tests.support.gateway_raw import fwdbwd_body, new_model, new_session, optim, post_fwdbwd, retrieve
from tests.support.sdk import DEV_KEY, GatewayProc, start_gateway

GAP_TIMEOUT = 2
MAX_AHEAD = 8
MAX_BODY = 300_000
LIMITS = {"TINKERKUBE_GATEWAY_SEQ_GAP_TIMEOUT_SECONDS": str(GAP_TIMEOUT),
          "TINKERKUBE_GATEWAY_MAX_SEQ_AHEAD": str(MAX_AHEAD),
          "TINKERKUBE_GATEWAY_MAX_SAMPLE_TOKENS": "64",
          "TINKERKUBE_GATEWAY_MAX_BODY_BYTES": str(MAX_BODY),
          "TINKERKUBE_GATEWAY_API_KEYS": '{"tml-local": "local", "tml-mallory": "mallory", "tml-revocable": "local"}'}


@pytest.fixture(scope="module")
def strict_gateway(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path) -> Iterator[GatewayProc]:
    gw = start_gateway(tmp_path_factory.mktemp("gw-strict") / "state", model_cache_dir=model_cache_dir,
                       extra_env=LIMITS)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def http(strict_gateway: GatewayProc) -> Iterator[httpx.Client]:
    with strict_gateway.http() as client:
        yield client


@pytest.fixture(scope="module")
def session(http: httpx.Client) -> str:
    return new_session(http)


def _outcome(http: httpx.Client, response: httpx.Response) -> Any:
    """What a submitted op came to: a forward_backward's outputs and metrics, or the JSON (a failure)."""
    assert response.status_code == 200, response.text
    done = retrieve(http, response.json()["request_id"])
    assert done.status_code == 200 and b"try_again" not in done.content, done.text
    if not done.headers["content-type"].startswith("application/x-protobuf"):
        return done.json()
    out = pb.ForwardBackwardOutput()
    out.ParseFromString(done.content)
    fields = [{name: bytes(t.data) for name, t in record.fields.items()} for record in out.loss_fn_outputs]
    return fields, dict(out.metrics)


def _steps(http: httpx.Client, model_id: str, first: int) -> list[Any]:
    """forward_backward, optim_step, forward_backward from seq_id `first` on: what a twin compares."""
    return [_outcome(http, post_fwdbwd(http, fwdbwd_body(model_id, first))),
            _outcome(http, optim(http, model_id, first + 1)),
            _outcome(http, post_fwdbwd(http, fwdbwd_body(model_id, first + 2)))]


@pytest.fixture(scope="module")
def twin(http: httpx.Client, session: str) -> list[Any]:
    """A run that only ever got good requests: forward_backward (seq 1), then the steps from seq 2."""
    model_id = new_model(http, session, TINY, model_seq_id=100)
    _outcome(http, post_fwdbwd(http, fwdbwd_body(model_id, 1)))
    return _steps(http, model_id, 2)


def _dro_nan(model_id: str, seq_id: int) -> bytes:
    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(fwdbwd_body(model_id, seq_id))
    msg.loss_fn = "cross_entropy"
    msg.loss_fn_config_v2["beta"].number = math.nan
    return msg.SerializeToString()


def _post(path: str, body: bytes | dict[str, object]) -> Callable[[httpx.Client], httpx.Response]:
    def send(http: httpx.Client) -> httpx.Response:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return http.post(path, content=raw, headers={"Content-Type": "application/json"})
    return send


def _fwdbwd(body: bytes, encoding: str | None = None) -> Callable[[httpx.Client], httpx.Response]:
    headers = {"Content-Type": "application/x-protobuf", **({"Content-Encoding": encoding} if encoding else {})}
    return lambda http: http.post("/api/v1/forward_backward", content=body, headers=headers)


# name -> (request for (model_id, seq_id), expected status, a phrase of the message)
Bad = Callable[[str, int], tuple[Callable[[httpx.Client], httpx.Response], int, str]]
BAD: dict[str, Bad] = {
    "negative learning rate": lambda m, s: (_post("/api/v1/optim_step", {
        "model_id": m, "seq_id": s, "adam_params": {"learning_rate": -1.0}}), 400, "learning_rate"),
    "infinite learning rate": lambda m, s: (_post("/api/v1/optim_step", json.dumps(
        {"model_id": m, "seq_id": s, "adam_params": {"learning_rate": math.inf}}).encode()), 400, "finite"),
    "NaN in loss_fn_config": lambda m, s: (_fwdbwd(_dro_nan(m, s)), 400, "loss_fn_config"),
    "negative TTL on save_state": lambda m, s: (_post("/api/v1/save_weights", {
        "model_id": m, "seq_id": s, "path": "a", "ttl_seconds": -5}), 400, "ttl_seconds"),
    "negative TTL on save_weights_for_sampler": lambda m, s: (_post("/api/v1/save_weights_for_sampler", {
        "model_id": m, "seq_id": s, "path": "b", "ttl_seconds": -1}), 400, "ttl_seconds"),
    "TTL past any date": lambda m, s: (_post("/api/v1/save_weights", {
        "model_id": m, "seq_id": s, "path": "c", "ttl_seconds": 10**30}), 400, "ttl_seconds"),
    "save_weights_external to a key that is none": lambda m, s: (_post("/api/v1/save_weights_external", {
        "model_id": m, "seq_id": s, "path": "hf", "age_encryption_recipients": ["age1nope"]}), 400,
        "age_encryption_recipients"),
    "a route that does not exist": lambda m, s: (_post("/api/v1/brand_new_op", {
        "model_id": m, "seq_id": s}), 404, "Not Found"),
    "malformed JSON": lambda m, s: (_post("/api/v1/optim_step", f'{{"model_id": "{m}", "seq_id": {s}, '
                                          '"adam_params": {"learning_'.encode()), 400, "not JSON"),
    "JSON nested 100,000 deep": lambda m, s: (_post("/api/v1/optim_step", f'{{"model_id": "{m}", "seq_id": {s}, '
                                                    f'"x": {"[" * 100_000}{"]" * 100_000}}}'.encode()),
                                              400, "deeper"),
    "truncated protobuf": lambda m, s: (_fwdbwd(fwdbwd_body(m, s)[:-7]), 400, "protobuf"),
    "body too large": lambda m, s: (_fwdbwd(fwdbwd_body(m, s, n=MAX_BODY // 10)), 413, "exceeds the limit"),
    "zstd body too large once decompressed": lambda m, s: (
        _fwdbwd(zstandard.ZstdCompressor().compress(fwdbwd_body(m, s, n=MAX_BODY // 10)), "zstd"),
        413, "larger than"),
    "unknown loss_fn": lambda m, s: (_fwdbwd(fwdbwd_body(m, s, loss_fn="nope")), 400, "unknown loss_fn"),
    "a seq_id reused for a different op": lambda m, s: (_post("/api/v1/optim_step", {
        "model_id": m, "seq_id": s - 1, "adam_params": {}}), 400, "already used"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_refused_request_uses_its_seq_id_and_the_run_goes_on_like_its_twin(
        http: httpx.Client, session: str, twin: list[Any], strict_gateway: GatewayProc, name: str) -> None:
    model_id = new_model(http, session, TINY, model_seq_id=sorted(BAD).index(name))
    _outcome(http, post_fwdbwd(http, fwdbwd_body(model_id, 1)))
    send, status, phrase = BAD[name](model_id, 2)
    refused = send(http)
    assert refused.status_code == status, refused.text
    assert refused.json()["category"] == "user" and phrase in refused.json()["detail"]
    assert refused.headers["x-should-retry"] == "false"
    if name == "a seq_id reused for a different op":  # nothing was free to use: seq 2 is the next one
        assert _steps(http, model_id, 2) == twin
    else:
        assert _steps(http, model_id, 3) == twin  # seq 2 was used up, and nothing of it ran
    assert httpx.get(strict_gateway.url + "/api/v1/healthz").status_code == 200


def test_ops_behind_a_seq_id_that_never_arrives_fail_naming_it_and_later_ops_go_on(
        http: httpx.Client, session: str, twin: list[Any]) -> None:
    model_id = new_model(http, session, TINY, model_seq_id=200)
    _outcome(http, post_fwdbwd(http, fwdbwd_body(model_id, 1)))
    behind = [post_fwdbwd(http, fwdbwd_body(model_id, 4)), optim(http, model_id, 5)]  # 2 and 3 never come
    for response in behind:
        failure = _outcome(http, response)
        assert failure["category"] == "user" and "seq_id 2, 3" in failure["error"], failure
        assert "never arrived" in failure["error"]
    late = optim(http, model_id, 2)
    assert late.status_code == 400 and "seq_id 2" in late.json()["detail"], late.text
    assert _steps(http, model_id, 6) == twin  # nothing that waited ran


def test_a_seq_id_far_ahead_is_refused_and_stays_free_for_its_op(http: httpx.Client, session: str) -> None:
    model_id = new_model(http, session, TINY, model_seq_id=201)
    _outcome(http, post_fwdbwd(http, fwdbwd_body(model_id, 1)))
    far = 2 + MAX_AHEAD + 1
    refused = optim(http, model_id, far)
    assert refused.status_code == 400 and "ahead" in refused.json()["detail"], refused.text
    for seq in range(2, far):
        _outcome(http, post_fwdbwd(http, fwdbwd_body(model_id, seq)))
    assert _outcome(http, optim(http, model_id, far)) == {"metrics": {"step:max": 1}}


def test_another_tenants_refused_request_leaves_my_seq_ids_alone(
        http: httpx.Client, session: str, strict_gateway: GatewayProc, twin: list[Any]) -> None:
    model_id = new_model(http, session, TINY, model_seq_id=202)
    _outcome(http, post_fwdbwd(http, fwdbwd_body(model_id, 1)))
    with strict_gateway.http("tml-mallory") as mallory:
        send, _, _ = BAD["negative learning rate"](model_id, 2)
        assert send(mallory).status_code == 400
    assert _steps(http, model_id, 2) == twin  # seq 2 is still mine to use


def test_an_unknown_model_is_a_404_and_the_server_answers_on(http: httpx.Client) -> None:
    response = optim(http, "sess-nope:train:0", 1)
    assert response.status_code == 404 and response.json()["category"] == "user"
    assert http.post("/api/v1/create_session", json={}).status_code == 200


GARBAGE = [b"", b"{", b"[]", b"\xff\xfe\x00", b'{"a": NaN, "b": -Infinity, "c": 1e999}',
           b'{"model_id": "m", "seq_id": 9223372036854775808, "ttl_seconds": 1e300, "offset": -1}',
           b"[" * 100_000 + b"]" * 100_000, b'{"x": "' + b"\\" * 1001 + b'"}']


def test_no_route_answers_a_5xx_to_garbage(http: httpx.Client, strict_gateway: GatewayProc) -> None:
    spec = httpx.get(strict_gateway.url + "/openapi.json").json()
    answered = 0
    with strict_gateway.http("tml-revocable") as revocable:
        for path, methods in spec["paths"].items():
            url = path.replace("{run_id}", "sess-x:train:0").replace("{checkpoint_id}", "weights/a")
            url = url.replace("{session_id}", "sess-x").replace("{sampler_id}", "sess-x:sample:0")
            for method in methods:
                # Revoking the calling key works whatever the body: it gets a key of its own, so the sweep goes on.
                client = revocable if (method, path) == ("delete", "/api/v1/auth/apikey/me") else http
                for body in GARBAGE:
                    response = client.request(method.upper(), url, content=body,
                                              params={"offset": 2**63, "limit": 10**30})
                    assert response.status_code < 500, (method, url, body[:40], response.text)
                    answered += 1
    for offset in (2**63, -1, 10**40):
        response = http.get("/api/v1/checkpoints", params={"offset": offset})
        assert response.status_code == 400 and "offset" in response.text, response.text
    assert answered > 100 and http.get("/api/v1/checkpoints").status_code == 200


def _datum(n: int = 6) -> types.Datum:
    tokens = list(range(1, n + 1))
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (n - 1)})


def test_the_sdk_gets_a_clear_error_for_each_bad_request_and_its_run_goes_on(strict_gateway: GatewayProc) -> None:
    with tinker.ServiceClient(base_url=strict_gateway.url, api_key=DEV_KEY) as service:
        training = service.create_lora_training_client(base_model=TINY, rank=4).result()
        data = [_datum()]
        before = training.forward_backward(data, "cross_entropy").result()
        refused: list[tuple[Callable[[], Any], str]] = [
            (lambda: training.optim_step(types.AdamParams(learning_rate=-1.0)), "learning_rate"),
            (lambda: training.optim_step(types.AdamParams(learning_rate=math.inf)), "finite number"),
            (lambda: training.forward_backward(data, "dro", {"beta": math.nan}), "loss_fn_config"),
            (lambda: training.save_state("a", ttl_seconds=-5), "ttl_seconds"),
            (lambda: training.save_weights_for_sampler("b", ttl_seconds=-1), "ttl_seconds"),
            (lambda: training.save_weights_external("c", age_encryption_recipients=["not-a-key"]),
             "age_encryption_recipients"),
        ]
        for call, phrase in refused:
            with pytest.raises(tinker.BadRequestError, match=phrase):
                call().result()
        assert training.forward_backward(data, "cross_entropy").result().metrics == before.metrics
        assert training.optim_step(types.AdamParams(learning_rate=1e-4)).result().metrics == {"step:max": 1.0}

        sampler = training.save_weights_and_get_sampling_client().result()
        prompt = types.ModelInput.from_ints([1, 2])
        with pytest.raises(tinker.BadRequestError, match="tokens one sample request may generate"):
            sampler.sample(prompt, 2, types.SamplingParams(max_tokens=2**31 - 1, stop=[])).result()
        with pytest.raises(tinker.BadRequestError, match="top_p"):  # (a NaN the SDK refuses to send itself)
            sampler.sample(prompt, 1, types.SamplingParams(top_p=0.0)).result()
        assert len(sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result().sequences) == 1
