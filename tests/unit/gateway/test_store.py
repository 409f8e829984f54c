"""The store behaves the same on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import time

import pytest

from tinkerkube_gateway.store.records import CheckpointRecord, FutureRecord, FutureState, SessionStatus
from tinkerkube_gateway.store.repo import Repo


def _future(request_id: str, target: str = "s:train:0", seq: int | None = 1, op: str = "optim_step",
            body: bytes | None = b"{}") -> FutureRecord:
    return FutureRecord(request_id=request_id, tenant="t", session_id="s", target_id=target, seq_id=seq,
                        trainer_seq=None, op=op, state=FutureState.PENDING, body=body, body_type="application/json",
                        meta={"ttl_seconds": 5}, result=None, result_type=None, error=None, category=None,
                        created_at=time.time(), completed_at=None)


def test_a_second_insert_of_the_same_key_returns_the_original_future(repo: Repo) -> None:
    first, created = repo.insert_future(_future("req-1"))
    again, created_again = repo.insert_future(_future("req-2"))
    assert created and not created_again
    assert again.request_id == first.request_id == "req-1"
    assert again.meta == {"ttl_seconds": 5}


def test_futures_without_seq_ids_never_collide(repo: Repo) -> None:
    assert repo.insert_future(_future("req-a", seq=None))[1]
    assert repo.insert_future(_future("req-b", seq=None))[1]


def test_a_future_finishes_once_and_keeps_its_result(repo: Repo) -> None:
    repo.insert_future(_future("req-1"))
    big = bytes(range(256)) * 4096
    assert repo.finish_future("req-1", state=FutureState.COMPLETE, now=time.time(), result=big,
                              result_type="application/x-protobuf")
    assert not repo.finish_future("req-1", state=FutureState.FAILED, now=time.time(), error="late")
    stored = repo.get_future("req-1")
    assert stored is not None and stored.state == FutureState.COMPLETE and stored.result == big
    assert repo.pending_futures() == []


def test_op_log_is_ordered_by_trainer_seq(repo: Repo) -> None:
    for seq in (3, 1, 2):
        repo.insert_future(_future(f"req-{seq}", seq=seq))
        repo.set_trainer_seq(f"req-{seq}", seq)
    assert [f.seq_id for f in repo.futures_after_trainer_seq("s:train:0", 1)] == [2, 3]
    assert repo.max_trainer_seq("s:train:0") == 3
    assert repo.max_trainer_seq("other") == 0


def test_sessions_idle_and_end(repo: Repo) -> None:
    now = time.time()
    repo.insert_session(session_id="s1", tenant="t", status=SessionStatus.ACTIVE, created_at=now,
                        last_heartbeat=now - 100, user_metadata={"a": 1}, tags=["x"], display_name=None,
                        ended_reason=None)
    assert [s.session_id for s in repo.idle_sessions(now - 50)] == ["s1"]
    assert repo.end_session("s1", SessionStatus.REAPED, "idle")
    assert not repo.end_session("s1", SessionStatus.FINISHED, "again")
    assert repo.count_active_sessions() == 0


def test_checkpoints_list_expire_and_delete(repo: Repo) -> None:
    now = time.time()
    for name, expires in (("a", now - 1), ("b", None)):
        repo.upsert_checkpoint(CheckpointRecord(
            tinker_path=f"tinker://r:train:0/weights/{name}", run_id="r:train:0", tenant="t", kind="weights",
            name=name, size_bytes=2**40, public=False, created_at=now, expires_at=expires, user_metadata=None))
    assert {c.name for c in repo.list_checkpoints(tenant="t", run_id="r:train:0")} == {"a", "b"}
    assert [c.name for c in repo.expired_checkpoints(now)] == ["a"]
    assert repo.delete_checkpoint("tinker://r:train:0/weights/a")
    assert repo.count_checkpoints("t") == 1
    assert repo.list_checkpoints(tenant="other") == []


@pytest.mark.parametrize("kind", ["train", "sample"])
def test_models_by_kind_and_liveness(repo: Repo, kind: str) -> None:
    now = time.time()
    assert repo.insert_model(model_id="m", session_id="s", tenant="t", kind=kind, base_model="b", lora={"rank": 4},
                             user_metadata=None, optimizer_config=None, restore_from=None, weights_key="base:b",
                             status="ready", error=None, created_at=now, last_request_time=now)
    assert not repo.insert_model(model_id="m", session_id="s", tenant="t", kind=kind, base_model="b", lora=None,
                                 user_metadata=None, optimizer_config=None, restore_from=None, weights_key=None,
                                 status="ready", error=None, created_at=now, last_request_time=now)
    assert [m.model_id for m in repo.list_models(kind=kind, live_only=True)] == ["m"]
    assert (repo.find_sampler_process("t", "base:b") is not None) == (kind == "sample")
