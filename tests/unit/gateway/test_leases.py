"""Run leases and their fence (store/coordination.py) on SQLite and PostgreSQL: one replica dispatches a
run; a takeover needs an expired lease and bumps the epoch; a stale owner can no longer log a trainer seq."""

from __future__ import annotations

import time

from tinkerkube_gateway.store.records import FutureRecord
from tinkerkube_gateway.store.repo import Repo

RUN = "s:train:0"


def _model(repo: Repo, model_id: str = RUN, status: str = "ready") -> None:
    now = time.time()
    repo.insert_model(model_id=model_id, session_id="s", tenant="t", kind="train", base_model="b", lora={},
                      user_metadata=None, optimizer_config=None, restore_from=None, weights_key=None,
                      status=status, error=None, created_at=now, last_request_time=now)


def _future(repo: Repo, seq: int) -> str:
    record = FutureRecord(request_id=f"req-{seq}", tenant="t", session_id="s", target_id=RUN, seq_id=seq,
                          trainer_seq=None, op="optim_step", state="pending", body=b"{}", body_type=None, meta=None,
                          result=None, result_type=None, error=None, category=None, created_at=time.time(),
                          completed_at=None)
    repo.insert_future(record)
    return record.request_id


def test_one_holder_at_a_time_and_takeover_after_expiry(repo: Repo) -> None:
    now = time.time()
    assert repo.claim_lease(RUN, "a", now, 10) == 1
    assert repo.claim_lease(RUN, "b", now + 5, 10) is None  # a's lease still runs
    assert repo.renew_leases("a", now + 9, 10) == {RUN: 1}
    assert repo.claim_lease(RUN, "b", now + 15, 10) is None  # renewed until now + 19
    assert repo.claim_lease(RUN, "b", now + 20, 10) == 2  # expired: taken over, a new epoch
    assert repo.renew_leases("a", now + 21, 10) == {}  # a learns it lost the run
    assert repo.claim_lease(RUN, "c", now + 21, 10, force=True) == 3  # SQLite's single replica


def test_a_stale_owner_cannot_log_a_trainer_seq(repo: Repo) -> None:
    now = time.time()
    first, second = _future(repo, 1), _future(repo, 2)
    assert repo.claim_lease(RUN, "a", now, 1) == 1
    assert repo.assign_trainer_seq(first, 1, model_id=RUN, owner="a", epoch=1)
    assert repo.claim_lease(RUN, "b", now + 2, 10) == 2
    assert not repo.assign_trainer_seq(second, 2, model_id=RUN, owner="a", epoch=1)  # fenced off
    assert repo.assign_trainer_seq(second, 2, model_id=RUN, owner="b", epoch=2)
    assert [f.trainer_seq for f in repo.futures_for_target(RUN)] == [1, 2]


def test_live_runs_without_a_live_lease_are_orphaned(repo: Repo) -> None:
    now = time.time()
    _model(repo, "s:train:0")
    _model(repo, "s:train:1")
    _model(repo, "s:train:2", status="stopped")
    repo.claim_lease("s:train:1", "a", now, 10)
    assert repo.orphaned_runs(now) == ["s:train:0"]
    assert sorted(repo.orphaned_runs(now + 11)) == ["s:train:0", "s:train:1"]
    repo.release_lease("s:train:1", "a")
    assert sorted(repo.orphaned_runs(now)) == ["s:train:0", "s:train:1"]


def test_sampler_users_are_the_active_sessions_holding_a_sampler(repo: Repo) -> None:
    now = time.time()
    for session in ("s1", "s2"):
        repo.insert_session(session_id=session, tenant="t", status="active", created_at=now, last_heartbeat=now,
                            user_metadata=None, tags=None, display_name=None, ended_reason=None)
        repo.insert_sampler(sampler_id=f"{session}:sample:0", session_id=session, tenant="t", base_model="b",
                            model_path=None, backing_model_id="s1:sampler:0", snapshot_id=None, created_at=now)
    assert repo.sampler_users("s1:sampler:0") == 2
    repo.end_session("s1", "finished", "done")  # type: ignore[arg-type]
    assert repo.sampler_users("s1:sampler:0") == 1
    repo.end_session("s2", "reaped", "idle")  # type: ignore[arg-type]
    assert repo.sampler_users("s1:sampler:0") == 0
