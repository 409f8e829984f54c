"""Two gateway replicas (separate processes) on one real PostgreSQL server, trainers shared between them
(tests.support.replica.SharedBackend, as TrainingSessions are on Kubernetes): one replica dispatches a
run at a time (lease), the other only persists and notifies; waiters anywhere are woken by NOTIFY; a
killed dispatching replica is taken over after its lease expires, and a sample it was running is re-run.
The fake trainer records every op PUT in arrival order and numbers optimizer steps, so a reordered, lost
or doubled op fails the test.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.component.gateway.conftest import TINY
from tests.support.gateway_raw import new_model, new_session, result_json, retrieve
from tests.support.postgres import fresh_database, postgres_url
from tests.support.replica import SHARED_ENV, kill_trainers
from tests.support.sdk import GatewayProc, start_gateway

__all__ = ["postgres_url"]
LONG_POLL = 10.0


class Cluster:
    def __init__(self, root: Path, model_cache_dir: Path, database_url: str):
        self.root, self.model_cache_dir = root, model_cache_dir
        self.shared = root / "trainers"
        self.shared.mkdir(parents=True)
        self.record = root / "ops.jsonl"
        self.env = {"TINKERKUBE_GATEWAY_DATABASE_URL": database_url, SHARED_ENV: str(self.shared),
                    "TINKERKUBE_GATEWAY_TRAINER_AUTH_TOKEN": "replica-test-token",
                    "TINKERKUBE_GATEWAY_LONG_POLL_SECONDS": str(LONG_POLL),
                    "TINKERKUBE_GATEWAY_LEASE_SECONDS": "2", "FAKE_TRAINER_RECORD": str(self.record),
                    "FAKE_TRAINER_OP_DELAY": "0.02", "FAKE_TRAINER_SAMPLE_DELAY": "1.0"}
        self.replicas: list[GatewayProc] = []

    def start(self, name: str) -> GatewayProc:
        gw = start_gateway(self.root / name, model_cache_dir=self.model_cache_dir, extra_env=self.env,
                           module="tests.support.replica")
        self.replicas.append(gw)
        return gw

    def arrivals(self, model_id: str) -> list[dict[str, Any]]:
        lines = self.record.read_text().splitlines() if self.record.exists() else []
        return [r for r in map(json.loads, lines) if r["model_id"] == model_id]

    def close(self) -> None:
        for gw in self.replicas:
            gw.stop(kill=True)
        kill_trainers(self.shared)


@pytest.fixture
def cluster(tmp_path: Path, model_cache_dir: Path, postgres_url: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, model_cache_dir, fresh_database(postgres_url))
    yield c
    c.close()


def _optim(http: httpx.Client, model_id: str, seq: int) -> str:
    """An optimizer step tagged by its seq_id (the learning rate), so the trainer log shows which op it is."""
    response = http.post("/api/v1/optim_step", json={"model_id": model_id, "seq_id": seq,
                                                     "adam_params": {"learning_rate": seq / 1000}})
    assert response.status_code == 200, response.text
    return response.json()["request_id"]  # type: ignore[no-any-return]


def _assert_exactly_once_in_order(cluster: Cluster, model_id: str, n: int) -> None:
    """Every trainer seq carried one op only (re-sends are the same op), and the trainer's order of ops
    is the SDK's seq order 1..n."""
    by_trainer_seq: dict[int, set[float]] = {}
    for put in cluster.arrivals(model_id):
        by_trainer_seq.setdefault(put["seq"], set()).add(json.loads(put["body"])["adam_params"]["learning_rate"])
    assert sorted(by_trainer_seq) == list(range(1, n + 1)), by_trainer_seq
    assert all(len(tags) == 1 for tags in by_trainer_seq.values()), by_trainer_seq
    assert [round(next(iter(by_trainer_seq[s])) * 1000) for s in range(1, n + 1)] == list(range(1, n + 1))


def _steps(http: httpx.Client, request_ids: list[str]) -> list[float]:
    """The fake trainer's step counter in each optim_step result: 1, 2, ... when each ran once, in order."""
    return [result_json(http, rid)["metrics"]["step:max"] for rid in request_ids]


def test_interleaved_submits_on_two_replicas_are_forwarded_in_seq_order_once(cluster: Cluster) -> None:
    a, b = cluster.start("a"), cluster.start("b")
    with a.http() as ha, b.http() as hb:
        model_id = new_model(ha, new_session(ha), TINY)
        order = [(2, hb), (1, ha), (4, ha), (3, hb), (5, hb), (7, ha), (6, hb), (8, ha), (10, hb), (9, ha)]
        ids = {seq: _optim(http, model_id, seq) for seq, http in order}
        assert _optim(hb, model_id, 3) == ids[3]  # a retried submit on the other replica: the same future
        steps = [result_json(ha if seq % 2 else hb, ids[seq])["metrics"]["step:max"] for seq in range(1, 11)]
    assert steps == list(range(1, 11))
    _assert_exactly_once_in_order(cluster, model_id, 10)


def test_a_waiter_on_one_replica_is_woken_by_a_completion_on_the_other(cluster: Cluster) -> None:
    a, b = cluster.start("a"), cluster.start("b")
    with a.http() as ha, b.http() as hb:
        model_id = new_model(ha, new_session(ha), TINY)  # a dispatches the run, so a completes its futures
        waiting_for = _optim(ha, model_id, 2)  # waits for seq 1
        answer: dict[str, httpx.Response] = {}
        started = threading.Event()

        def wait_on_b() -> None:
            started.set()
            answer["r"] = hb.post("/api/v1/retrieve_future", json={"request_id": waiting_for}, timeout=30)

        waiter = threading.Thread(target=wait_on_b)
        waiter.start()
        started.wait()
        threading.Event().wait(0.5)  # the waiter is now held on b
        _optim(ha, model_id, 1)
        waiter.join(LONG_POLL + 5)
    body = answer["r"].json()
    assert body.get("type") != "try_again", "b answered only when its long-poll window ended"
    assert body["metrics"]["step:max"] == 2


def _sample(http: httpx.Client, session_id: str) -> str:
    """A base-model sample (a sampler process, 1 s per sample in the fake trainer)."""
    created = http.post("/api/v1/create_sampling_session",
                        json={"session_id": session_id, "sampling_session_seq_id": 0, "base_model": TINY})
    assert created.status_code == 200, created.text
    response = http.post("/api/v1/asample", json={
        "sampling_session_id": created.json()["sampling_session_id"], "seq_id": 0, "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}, "sampling_params": {"max_tokens": 2}})
    assert response.status_code == 200, response.text
    return response.json()["request_id"]  # type: ignore[no-any-return]


def test_a_killed_dispatching_replica_is_taken_over_in_order(cluster: Cluster) -> None:
    a, b = cluster.start("a"), cluster.start("b")
    with a.http() as ha, b.http() as hb:
        session_id = new_session(ha)
        model_id = new_model(ha, session_id, TINY)
        first = [_optim(ha, model_id, seq) for seq in (1, 2, 3)]
        assert _steps(ha, first) == [1, 2, 3]
        sample = _sample(ha, session_id)  # still running on a when a dies
        in_flight = [_optim(ha, model_id, 4), _optim(hb, model_id, 5)]
        a.stop(kill=True)  # no clean shutdown: its leases have to expire
        later = [_optim(hb, model_id, seq) for seq in (6, 7, 8)]
        assert _steps(hb, in_flight + later) == [4, 5, 6, 7, 8]
        assert retrieve(hb, first[0]).json()["metrics"]["step:max"] == 1  # earlier results still readable
        assert retrieve(hb, sample).headers["content-type"].startswith("application/x-protobuf")  # re-run on b
    _assert_exactly_once_in_order(cluster, model_id, 8)
