"""The one exception→HTTP map: statuses, categories, x-should-retry, never an empty or a 402/409 body."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, HTTPException
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
