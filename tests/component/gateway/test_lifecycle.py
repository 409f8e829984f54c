"""Idle reaping, gateway restarts and trainer crashes: never a hang, never a lost future."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.component.gateway.conftest import TINY
from tests.support.eventually import eventually_sync
from tests.support.gateway_raw import fwdbwd_body, loss_of, new_model, new_session, post_fwdbwd, retrieve
from tests.support.sdk import GatewayProc, start_gateway


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def _heartbeating(gw: GatewayProc, session_id: str) -> Iterator[None]:
    stop = threading.Event()

    def beat() -> None:
        with gw.http() as http:
            while not stop.wait(0.5):
                http.post("/api/v1/session_heartbeat", json={"session_id": session_id})

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_idle_session_is_reaped_with_its_trainers(tmp_path: Path, model_cache_dir: Path) -> None:
    extra = {"TINKERKUBE_GATEWAY_SESSION_IDLE_TIMEOUT_SECONDS": "3",
             "TINKERKUBE_GATEWAY_REAPER_INTERVAL_SECONDS": "0.5",
             "TINKERKUBE_GATEWAY_POOL_IDLE_TIMEOUT_SECONDS": "1", "FAKE_TRAINER_OP_DELAY": "30"}
    gw = start_gateway(tmp_path / "state", model_cache_dir=model_cache_dir, extra_env=extra)
    try:
        with gw.http() as http:
            session_id = new_session(http)
            with _heartbeating(gw, session_id):  # the trainer takes longer to start than the idle timeout
                model_id = new_model(http, session_id, TINY)
            pid = next(iter(gw.trainer_pids().values()))
            pending = post_fwdbwd(http, fwdbwd_body(model_id, 1)).json()["request_id"]
            failed = retrieve(http, pending, timeout=30).json()
            assert "no heartbeat" in failed["error"]
            assert http.post("/api/v1/session_heartbeat", json={"session_id": session_id}).status_code == 410
            # its run detached, the pool it leaves empty stops after the pool idle timeout
            eventually_sync(lambda: _alive(pid), lambda alive: not alive, timeout=15, what="trainer pool stopped")
    finally:
        gw.stop()


def _train(http: httpx.Client, model_id: str, seqs: range) -> list[str]:
    return [post_fwdbwd(http, fwdbwd_body(model_id, s)).json()["request_id"] for s in seqs]


def _losses(http: httpx.Client, request_ids: list[str]) -> list[float]:
    out = []
    for request_id in request_ids:
        response = retrieve(http, request_id)
        assert response.headers["content-type"].startswith("application/x-protobuf"), response.text
        out.append(loss_of(response.content))
    return out


def test_a_killed_gateway_loses_no_future_its_pool_is_adopted(tmp_path: Path, model_cache_dir: Path) -> None:
    state = tmp_path / "state"
    gw = start_gateway(state, model_cache_dir=model_cache_dir, extra_env={"FAKE_TRAINER_OP_DELAY": "0.3"})
    with gw.http() as http:
        model_id = new_model(http, new_session(http), TINY)
        done = _train(http, model_id, range(1, 2))[0]
        first = retrieve(http, done).content
        slow = _train(http, model_id, range(2, 6))
    pid = next(iter(gw.trainer_pids().values()))
    gw.stop(kill=True)  # no clean shutdown: the pool goes on without a gateway
    gw2 = start_gateway(state, model_cache_dir=model_cache_dir)
    try:
        with gw2.http() as http:
            assert retrieve(http, done).content == first  # results stay re-readable
            assert len(_losses(http, slow)) == 4  # every future resolves with its result
            assert len(_losses(http, _train(http, model_id, range(6, 8)))) == 2  # and the run goes on
        assert _alive(pid) and list(gw2.trainer_pids().values()) == [pid]  # the same pool, adopted
    finally:
        gw2.stop()


def test_a_pool_that_died_with_the_gateway_comes_back_and_replays(tmp_path: Path, model_cache_dir: Path) -> None:
    state = tmp_path / "state"
    gw = start_gateway(state, model_cache_dir=model_cache_dir, extra_env={"FAKE_TRAINER_OP_DELAY": "0.3"})
    with gw.http() as http:
        model_id = new_model(http, new_session(http), TINY)
        early = _losses(http, _train(http, model_id, range(1, 3)))
        slow = _train(http, model_id, range(3, 6))
    pid = next(iter(gw.trainer_pids().values()))
    gw.stop(kill=True)
    os.killpg(pid, signal.SIGKILL)  # ... and its pool dies while no gateway watches
    gw2 = start_gateway(state, model_cache_dir=model_cache_dir)
    try:
        with gw2.http() as http:
            assert len(early) == 2 and len(_losses(http, slow)) == 3
            assert len(_losses(http, _train(http, model_id, range(6, 7)))) == 1
        assert pid not in gw2.trainer_pids().values()
    finally:
        gw2.stop()


def test_a_killed_pool_is_started_again_and_no_future_is_lost(tmp_path: Path, model_cache_dir: Path) -> None:
    gw = start_gateway(tmp_path / "state", model_cache_dir=model_cache_dir)
    try:
        with gw.http() as http:
            model_id = new_model(http, new_session(http), TINY)
            assert len(_losses(http, _train(http, model_id, range(1, 3)))) == 2
            pid = next(iter(gw.trainer_pids().values()))
            os.killpg(pid, signal.SIGKILL)
            time.sleep(0.5)
            assert len(_losses(http, _train(http, model_id, range(3, 6)))) == 3
            assert next(iter(gw.trainer_pids().values())) != pid
            run = http.get(f"/api/v1/training_runs/{model_id}").json()
            assert run["corrupted"] is False
    finally:
        gw.stop()


def test_a_pool_that_keeps_dying_fails_its_runs_clearly(tmp_path: Path, model_cache_dir: Path) -> None:
    gw = start_gateway(tmp_path / "state", model_cache_dir=model_cache_dir,
                       extra_env={"TINKERKUBE_GATEWAY_POOL_MAX_RESTARTS": "1"})
    try:
        with gw.http() as http:
            model_id = new_model(http, new_session(http), TINY)
            os.killpg(next(iter(gw.trainer_pids().values())), signal.SIGKILL)
            time.sleep(0.5)
            assert len(_losses(http, _train(http, model_id, range(1, 2)))) == 1  # started again once
            os.killpg(next(iter(gw.trainer_pids().values())), signal.SIGKILL)
            time.sleep(0.5)
            failed = retrieve(http, _train(http, model_id, range(2, 3))[0]).json()  # not a second time
            assert "is gone" in failed["error"] and failed["category"] == "server"
    finally:
        gw.stop()


pytestmark = pytest.mark.slow


def test_finishing_a_session_stops_its_trainers_and_fails_its_runs(shared_gateway: GatewayProc) -> None:
    def attached() -> set[str]:
        return {run for runs in shared_gateway.pools().values() for run in runs}

    with shared_gateway.http() as http:
        session_id = new_session(http)
        model_id = new_model(http, session_id, TINY)
        assert model_id in attached()
        assert http.post(f"/api/v1/sessions/{session_id}/finish", json={"reason": {"type": "success"}}).is_success
        eventually_sync(attached, lambda runs: model_id not in runs, timeout=15, what="run detached")
        late = retrieve(http, post_fwdbwd(http, fwdbwd_body(model_id, 1)).json()["request_id"]).json()
        assert "finished" in late["error"]
