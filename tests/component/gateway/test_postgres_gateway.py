"""The gateway on PostgreSQL (a real throwaway server): futures survive a restart like on SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.component.gateway.conftest import TINY
from tests.support.gateway_raw import fwdbwd_body, new_model, new_session, post_fwdbwd, retrieve
from tests.support.postgres import fresh_database, postgres_url
from tests.support.sdk import start_gateway

__all__ = ["postgres_url"]
pytestmark = pytest.mark.slow


def test_gateway_on_postgres_keeps_results_across_a_restart(tmp_path: Path, model_cache_dir: Path,
                                                           postgres_url: str) -> None:
    env = {"TINKERKUBE_GATEWAY_DATABASE_URL": fresh_database(postgres_url)}
    gw = start_gateway(tmp_path / "a", model_cache_dir=model_cache_dir, extra_env=env)
    try:
        with gw.http() as http:
            model_id = new_model(http, new_session(http), TINY)
            request_id = post_fwdbwd(http, fwdbwd_body(model_id, 1)).json()["request_id"]
            first = retrieve(http, request_id)
            assert first.headers["content-type"].startswith("application/x-protobuf")
    finally:
        gw.stop()
    gw2 = start_gateway(tmp_path / "b", model_cache_dir=model_cache_dir, extra_env=env)  # another replica's disk
    try:
        with gw2.http() as http:
            assert retrieve(http, request_id).content == first.content
            assert http.get(f"/api/v1/training_runs/{model_id}").json()["training_run_id"] == model_id
    finally:
        gw2.stop()
