"""Idle reaping, gateway restarts and trainer crashes: never a hang, never a lost future."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.component.gateway.conftest import TINY
from tests.support.eventually import eventually_sync
from tests.support.gateway_raw import fwdbwd_body, new_model, new_session, post_fwdbwd, retrieve
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


def test_gateway_restart_loses_no_future(tmp_path: Path, model_cache_dir: Path) -> None:
    state = tmp_path / "state"
    gw = start_gateway(state, model_cache_dir=model_cache_dir, extra_env={"FAKE_TRAINER_OP_DELAY": "0.5"})
    with gw.http() as http:
        session_id = new_session(http)
        model_id = new_model(http, session_id, TINY)
        done = post_fwdbwd(http, fwdbwd_body(model_id, 1)).json()["request_id"]
        first = retrieve(http, done).content
        slow = [post_fwdbwd(http, fwdbwd_body(model_id, s)).json()["request_id"] for s in (2, 3, 4)]
    pid = next(iter(gw.trainer_pids().values()))
    gw.stop(kill=True)  # no clean shutdown: the trainer is orphaned
    gw2 = start_gateway(state, model_cache_dir=model_cache_dir)
    try:
        with gw2.http() as http:
            assert retrieve(http, done).content == first  # results stay re-readable
            outcomes = [retrieve(http, r) for r in slow]
            assert all(o.status_code == 200 for o in outcomes)
            failed = [o.json() for o in outcomes if o.headers["content-type"].startswith("application/json")]
            assert failed and all("gateway restarted" in f["error"] and f["category"] == "server" for f in failed)
        eventually_sync(lambda: _alive(pid), lambda alive: not alive, timeout=10, what="orphan trainer killed")
    finally:
        gw2.stop()


def test_crashed_trainer_fails_the_next_future_clearly(tmp_path: Path, model_cache_dir: Path) -> None:
    gw = start_gateway(tmp_path / "state", model_cache_dir=model_cache_dir)
    try:
        with gw.http() as http:
            model_id = new_model(http, new_session(http), TINY)
            pid = next(iter(gw.trainer_pids().values()))
            os.killpg(pid, signal.SIGKILL)
            time.sleep(0.5)
            response = post_fwdbwd(http, fwdbwd_body(model_id, 1))
            failed = retrieve(http, response.json()["request_id"]).json()
            assert "is gone" in failed["error"] and "exited" in failed["error"]
            later = retrieve(http, post_fwdbwd(http, fwdbwd_body(model_id, 2)).json()["request_id"]).json()
            assert later["error"]
            run = http.get(f"/api/v1/training_runs/{model_id}").json()
            assert run["corrupted"] is True
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
