"""The one exception→HTTP map: statuses, categories, x-should-retry, never an empty or a 402/409 body."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.testclient import TestClient

from tinkerkube_contract.paths import InvalidTinkerPath
from tinkerkube_gateway import errors


def _client(exc: Exception) -> TestClient:
    app = FastAPI()
    errors.install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise exc

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize(("exc", "status", "category", "retry"), [
    (errors.InvalidRequest("bad"), 400, "user", "false"),
    (errors.SeqIdReused("reused"), 400, "user", "false"),
    (errors.UnknownModel("nope"), 404, "user", "false"),
    (errors.Unauthenticated("who"), 401, "user", "false"),
    (errors.SessionGone("gone"), 410, "user", "false"),
    (errors.PayloadTooLarge("big"), 413, "user", "false"),
    (errors.TrainerUnavailable("later"), 503, "server", "true"),
    (InvalidTinkerPath("../x"), 400, "user", "false"),
    (HTTPException(409, "conflict"), 400, "user", "false"),
    (HTTPException(402, "pay"), 400, "user", "false"),
    (RuntimeError("bug"), 500, "server", "true"),
])
def test_each_error_maps_to_one_status_with_a_json_body(exc: Exception, status: int, category: str,
                                                        retry: str) -> None:
    response = _client(exc).get("/boom")
    assert response.status_code == status
    assert response.json()["category"] == category and response.json()["detail"]
    assert response.headers["x-should-retry"] == retry


def test_paths_tricks_never_reach_the_file_system() -> None:
    from tinkerkube_contract.paths import parse_checkpoint_id

    for bad in ("weights/../../etc", "weights/a/b", "weights/.x", "nope/x", "weights/"):
        with pytest.raises(InvalidTinkerPath):
            parse_checkpoint_id("s:train:0", bad)


def _refusing_app(exc: Exception, hook_raises: bool = False) -> tuple[TestClient, list[tuple[str, str]]]:
    calls: list[tuple[str, str]] = []

    async def on_refused(request: Request, detail: str) -> None:
        calls.append((request.url.path, detail))
        if hook_raises:
            raise RuntimeError("the store is down")

    app = FastAPI()
    errors.install_error_handlers(app, on_refused=on_refused)

    @app.post("/api/v1/optim_step")
    async def step() -> None:
        raise exc

    return TestClient(app, raise_server_exceptions=False), calls


@pytest.mark.parametrize(("exc", "consumed"), [
    (errors.InvalidRequest("lr must be >= 0"), True),
    (errors.PayloadTooLarge("big"), True),
    (InvalidTinkerPath("../x"), True),
    (errors.SeqIdReused("used"), False),  # the seq_id is taken already
    (errors.SeqIdTooFarAhead("ahead"), False),  # the seq_id stays free for its real op
    (errors.TrainerUnavailable("later"), False),  # a 5xx is retried with the same seq_id
    (RuntimeError("bug"), False),
])
def test_a_refusal_is_reported_to_the_hook_unless_it_must_leave_the_seq_id_alone(exc: Exception,
                                                                                consumed: bool) -> None:
    client, calls = _refusing_app(exc)
    client.post("/api/v1/optim_step", json={})
    assert bool(calls) == consumed
    if consumed:
        assert calls == [("/api/v1/optim_step", str(getattr(exc, "detail", exc)))]


def test_a_route_that_does_not_exist_is_a_refusal_too() -> None:
    client, calls = _refusing_app(errors.InvalidRequest("x"))
    assert client.post("/api/v1/save_weights_external_v2", json={}).status_code == 404
    assert calls == [("/api/v1/save_weights_external_v2", "Not Found")]


def test_a_hook_that_fails_still_answers_the_refusal_not_a_500() -> None:
    client, calls = _refusing_app(errors.InvalidRequest("lr must be >= 0"), hook_raises=True)
    response = client.post("/api/v1/optim_step", json={})
    assert response.status_code == 400 and response.json() == {"detail": "lr must be >= 0", "category": "user"}
    assert calls


def test_an_unexpected_exception_is_logged_and_answered_as_a_json_500(caplog: pytest.LogCaptureFixture) -> None:
    client, calls = _refusing_app(KeyError("oops"))
    response = client.post("/api/v1/optim_step", json={})
    assert response.status_code == 500 and response.json() == {"detail": "internal error: KeyError",
                                                               "category": "server"}
    assert response.headers["x-should-retry"] == "true" and not calls
    assert "unhandled error" in caplog.text
