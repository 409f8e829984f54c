"""The queries behind retrieve_futures, session search and URL signing, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time

from tinkerkube_gateway.store.protocol import EventTarget, clone_of
from tinkerkube_gateway.store.records import CheckpointRecord, FutureRecord, FutureState, SessionStatus
from tinkerkube_gateway.store.repo import Repo


def _sample(request_id: str, seq: int, target: str = "s:sample:0") -> FutureRecord:
    return FutureRecord(request_id=request_id, tenant="t", session_id="s", target_id=target, seq_id=seq,
                        trainer_seq=None, op="sample", state=FutureState.PENDING, body=b"{}", body_type=None,
                        meta=None, result=None, result_type=None, error=None, category=None, created_at=time.time(),
                        completed_at=None)


def _finish(repo: Repo, fut: FutureRecord, state: FutureState = FutureState.COMPLETE) -> bool:
    event = EventTarget(fut.target_id, clone_of(fut.seq_id), 7 if state == FutureState.COMPLETE else None)
    return repo.finish_future(fut.request_id, state=state, now=time.time(), result=b"x" * 7, event=event)


def test_completions_are_logged_in_commit_order_per_sampling_session_and_client_copy(repo: Repo) -> None:
    futs = [_sample(f"req-{i}", seq) for i, seq in enumerate([0, 1, 2_000_000_001, 2])]
    other = _sample("req-other", 0, target="s:sample:1")
    for fut in [*futs, other]:
        repo.insert_future(fut)
    for fut in [futs[1], futs[2], futs[0], other]:
        assert _finish(repo, fut)
    assert not _finish(repo, futs[0])  # a second finish logs nothing
    _finish(repo, futs[3], FutureState.FAILED)
    events = repo.future_events("s:sample:0", 0, after=0)
    assert [e.request_id for e in events] == ["req-1", "req-0", "req-3"]  # clone 2's and the other session's apart
    assert [e.serial for e in events] == sorted(e.serial for e in events)
    assert events[-1].state == FutureState.FAILED and events[0].size == 7
    assert [e.request_id for e in repo.future_events("s:sample:0", 2, after=0)] == ["req-2"]
    assert [e.request_id for e in repo.future_events("s:sample:1", 0, after=0)] == ["req-other"]
    assert [e.request_id for e in repo.future_events("s:sample:0", 0, after=events[0].serial)] == ["req-0", "req-3"]
    repo.trim_future_events("s:sample:0", 0, events[1].serial)
    assert [e.request_id for e in repo.future_events("s:sample:0", 0, after=0)] == ["req-3"]
    assert repo.drop_future_events_before(time.time() - 3600, 10) == 0  # none that old
    assert repo.drop_future_events_before(time.time() + 1, 2) == 2  # at most a batch a call
    assert repo.drop_future_events_before(time.time() + 1, 2) == 1
    assert repo.future_events("s:sample:0", 2, after=0) == [] and repo.future_events("s:sample:1", 0, after=0) == []
    assert clone_of(None) == 0 and clone_of(2_000_000_001) == 2


def test_concurrent_completions_get_distinct_serials(repo: Repo) -> None:
    futs = [_sample(f"req-{i}", i) for i in range(16)]
    for fut in futs:
        repo.insert_future(fut)
    threads = [threading.Thread(target=_finish, args=(repo, fut)) for fut in futs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    serials = [e.serial for e in repo.future_events("s:sample:0", 0, after=0)]
    assert sorted(serials) == list(range(1, 17))


def _session(repo: Repo, session_id: str, created: float, **values: object) -> None:
    repo.insert_session(session_id=session_id, tenant=values.pop("tenant", "t"), status=SessionStatus.ACTIVE,
                        created_at=created, last_heartbeat=created, user_metadata=None, tags=None,
                        display_name=None, ended_reason=None)


def test_session_search_pages_newest_first_by_project(repo: Repo) -> None:
    for i, session_id in enumerate(["sess-a", "sess-b", "sess-c", "sess-d"]):
        _session(repo, session_id, 100.0 + (i // 2))  # b and a share a creation time, as do d and c
    _session(repo, "sess-x", 500.0, tenant="other")
    repo.set_session_extras("sess-b", project_id="p1")
    repo.set_session_extras("sess-b", finish_reason="success")  # an update keeps the project
    assert repo.session_extras(["sess-b", "sess-c"])["sess-b"].project_id == "p1"

    def ids(**kw: object) -> list[str]:
        args = {"session_id": None, "before": None, "project_ids": None, "default_project": "default", "limit": 10}
        return [s.session_id for s in repo.search_sessions("t", **{**args, **kw})]

    assert ids() == ["sess-d", "sess-c", "sess-b", "sess-a"]
    assert ids(before=(101.0, "sess-d")) == ["sess-c", "sess-b", "sess-a"]
    assert ids(before=(100.0, "sess-b"), limit=1) == ["sess-a"]
    assert ids(project_ids=["p1"]) == ["sess-b"]
    assert ids(project_ids=["default"]) == ["sess-d", "sess-c", "sess-a"]
    assert ids(session_id="sess-c") == ["sess-c"]


def test_session_storage_counts_the_checkpoints_of_a_sessions_runs(repo: Repo) -> None:
    for run, session in (("sess-a:train:0", "sess-a"), ("sess-a:train:1", "sess-a"), ("sess-b:train:0", "sess-b")):
        repo.insert_model(model_id=run, session_id=session, tenant="t", kind="train", base_model="m", lora=None,
                          user_metadata=None, optimizer_config=None, restore_from=None, weights_key=None,
                          status="ready", error=None, created_at=1.0, last_request_time=1.0)
    for i, run in enumerate(["sess-a:train:0", "sess-a:train:0", "sess-a:train:1", "sess-b:train:0"]):
        repo.upsert_checkpoint(CheckpointRecord(tinker_path=f"tinker://{run}/weights/c{i}", run_id=run, tenant="t",
                                                kind="weights", name=f"c{i}", size_bytes=10 * (i + 1), public=False,
                                                created_at=1.0, expires_at=None, user_metadata=None))
    storage = repo.session_storage(["sess-a", "sess-b", "sess-z"])
    assert (storage["sess-a"].checkpoints, storage["sess-a"].size_bytes) == (3, 60)
    assert (storage["sess-b"].checkpoints, storage["sess-b"].size_bytes) == (1, 40) and "sess-z" not in storage
    assert repo.count_checkpoints("t", "sess-a:train:0") == 2 and repo.count_checkpoints("t") == 4


def test_a_shared_secret_is_made_once_and_read_alike(repo: Repo) -> None:
    first = repo.shared_secret("signing")
    assert len(first) == 32 and repo.shared_secret("signing") == first and repo.shared_secret("other") != first
