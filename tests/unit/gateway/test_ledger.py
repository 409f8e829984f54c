"""The account queries (clone ids, revoked keys, audit, usage) on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time

from sqlalchemy import text

from tinkerkube_gateway.store.ledger import HOUR, Usage
from tinkerkube_gateway.store.records import FutureRecord, FutureState
from tinkerkube_gateway.store.repo import Repo, widen_seq_ids


def _sample(request_id: str, seq: int) -> FutureRecord:
    return FutureRecord(request_id=request_id, tenant="t", session_id="s", target_id="s:sample:0", seq_id=seq,
                        trainer_seq=None, op="sample", state=FutureState.PENDING, body=b"{}", body_type=None,
                        meta=None, result=None, result_type=None, error=None, category=None, created_at=time.time(),
                        completed_at=None)


def test_concurrent_joins_get_distinct_clone_ids_per_sampling_session(repo: Repo) -> None:
    got: list[int] = []
    lock = threading.Lock()

    def join() -> None:
        for _ in range(5):
            clone = repo.next_clone("s:sample:0")
            with lock:
                got.append(clone)

    threads = [threading.Thread(target=join) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(got) == list(range(1, 31))  # never 0 (the original client), never twice
    assert repo.next_clone("s:sample:1") == 1  # counted per sampling session


def test_sample_seq_ids_of_clones_past_2_to_the_31_are_stored(repo: Repo) -> None:
    seq = 5 * 1_000_000_000 + 7  # clone 5's seventh sample
    _, created = repo.insert_future(_sample("req-big", seq))
    assert created and repo.get_future("req-big").seq_id == seq  # type: ignore[union-attr]
    assert repo.insert_future(_sample("req-again", seq))[0].request_id == "req-big"  # the unique key still holds


def test_an_integer_seq_id_column_of_an_older_postgresql_store_is_widened(repo: Repo) -> None:
    if repo.engine.dialect.name != "postgresql":
        return  # SQLite's INTEGER is 64-bit: nothing to widen (the test above stores such a seq_id)
    with repo.engine.begin() as conn:
        conn.execute(text("ALTER TABLE futures ALTER COLUMN seq_id TYPE INTEGER"))
    widen_seq_ids(repo.engine)
    widen_seq_ids(repo.engine)  # idempotent
    with repo.engine.connect() as conn:
        kind = conn.execute(text("SELECT data_type FROM information_schema.columns WHERE table_name = 'futures' "
                                 "AND column_name = 'seq_id'")).scalar()
    assert kind == "bigint"


def test_a_revocation_is_stored_once_with_its_audit_record(repo: Repo) -> None:
    now = time.time()
    assert repo.revoke_key("f" * 64, "alice", now, {"key_id": 1})
    assert not repo.revoke_key("f" * 64, "alice", now, {"key_id": 1})  # revoked before: nothing new
    assert repo.revoked_fingerprints() == {"f" * 64}
    rows = repo.audit_events("alice", now - 1, now + 1, None, 100)
    assert [(r.event, r.category, r.details) for r in rows] == [("api_key_revoke", "organizations", {"key_id": 1})]
    assert repo.audit_events("bob", now - 1, now + 1, None, 100) == []


def test_audit_events_are_filtered_by_day_window_category_and_limit(repo: Repo) -> None:
    base = 1_800_000_000.0
    for i, (event, category) in enumerate([("session_create", "organizations"), ("checkpoint_delete", "checkpoints"),
                                           ("project_set", "projects"), ("checkpoint_publish", "checkpoints")]):
        repo.audit("alice", base + i, event, category, {"i": i})
    repo.audit("alice", base + 100, "session_finish", "organizations", {})
    events = repo.audit_events("alice", base, base + 100, None, 100)
    assert [e.event for e in events] == ["session_create", "checkpoint_delete", "project_set", "checkpoint_publish"]
    assert [e.details["i"] for e in repo.audit_events("alice", base, base + 100, ["checkpoints"], 100)] == [1, 3]
    assert len(repo.audit_events("alice", base, base + 1000, None, 2)) == 2


def test_usage_is_recorded_once_with_the_finish_and_summed_per_hour(repo: Repo) -> None:
    for i in range(3):
        repo.insert_future(_sample(f"req-{i}", i))
    usage = Usage("t", "s", "s:sample:0", (("sampling_prefill", 4), ("sampling_sample", 6)))
    hour = 500_000
    for i in range(3):
        assert repo.finish_future(f"req-{i}", state=FutureState.COMPLETE, now=hour * HOUR + 10 * i, usage=usage)
    assert not repo.finish_future("req-0", state=FutureState.COMPLETE, now=hour * HOUR, usage=usage)  # counted once
    rows = repo.usage_buckets("t", hour, hour + 1)
    assert sorted((r.kind, r.quantity, r.hour, r.session_id) for r in rows) == [
        ("sampling_prefill", 12, hour, "s"), ("sampling_sample", 18, hour, "s")]
    assert repo.usage_buckets("t", hour + 1, hour + 2) == [] and repo.usage_buckets("u", hour, hour + 1) == []
