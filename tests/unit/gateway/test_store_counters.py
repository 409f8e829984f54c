"""A run's futures aggregates (status.futures) are counted as futures are stored and finished; they must
equal what the stored futures themselves say, on SQLite and PostgreSQL, and after a store made before the
counters existed is opened."""

from __future__ import annotations

import dataclasses
import random
import time

from sqlalchemy import text

from tests.support.store import reopened
from tinkerkube_gateway.store.records import FutureRecord, FutureState
from tinkerkube_gateway.store.repo import Repo

RUN, OTHER = "s:train:0", "s:train:1"


def _future(request_id: str, target: str, seq: int | None, state: FutureState, now: float) -> FutureRecord:
    done = state != FutureState.PENDING
    return FutureRecord(request_id=request_id, tenant="t", session_id="s", target_id=target, seq_id=seq,
                        trainer_seq=None, op="forward_backward", state=state, body=b"{}", body_type="application/json",
                        meta=None, result=None, result_type=None, error="refused" if done else None,
                        category="user" if done else None, created_at=now, completed_at=now if done else None)


def _derived(futures: list[FutureRecord]) -> dict[str, int]:
    """The aggregates as the stored futures state them (what the counters must always equal)."""
    complete = sum(f.state == FutureState.COMPLETE for f in futures)
    failed = sum(f.state == FutureState.FAILED for f in futures)
    seqs = [f.seq_id for f in futures if f.seq_id is not None]
    done_seqs = [f.seq_id for f in futures if f.seq_id is not None and f.state != FutureState.PENDING]
    return {"submitted": len(futures), "completed": complete, "failed": failed,
            "pending": len(futures) - complete - failed, "last_seq_id": max(seqs, default=0),
            "last_completed_seq_id": max(done_seqs, default=0)}


def _recent(futures: list[FutureRecord], limit: int) -> list[str]:
    changed = sorted(futures, key=lambda f: f.completed_at if f.completed_at is not None else f.created_at)
    return [f.request_id for f in changed[-limit:]]


def _mixed_history(repo: Repo, seed: int) -> None:
    """Inserts (pending, refused at once, without seq_id, retried duplicates), out-of-order completions,
    late second completions, on two runs."""
    rng = random.Random(seed)
    clock = time.time()
    pending: list[str] = []
    for i in range(120):
        clock += 1.0
        target = RUN if rng.random() < 0.8 else OTHER
        seq = None if rng.random() < 0.1 else i
        state = FutureState.FAILED if rng.random() < 0.1 else FutureState.PENDING
        record = _future(f"req-{i}", target, seq, state, clock)
        assert repo.insert_future(record)[1]
        if seq is not None:  # a retried submit of the same seq_id is not a new future
            assert not repo.insert_future(dataclasses.replace(record, request_id=f"dup-{i}"))[1]
        if state == FutureState.PENDING:
            pending.append(record.request_id)
        if pending and rng.random() < 0.6:
            clock += 0.5
            done = pending.pop(rng.randrange(len(pending)))
            final = FutureState.COMPLETE if rng.random() < 0.8 else FutureState.FAILED
            assert repo.finish_future(done, state=final, now=clock)
            assert not repo.finish_future(done, state=FutureState.FAILED, now=clock + 0.1)  # a late replay


def test_counters_equal_what_the_futures_say_after_any_history(repo: Repo) -> None:
    _mixed_history(repo, seed=7)
    for target in (RUN, OTHER):
        futures = repo.futures_for_target(target)
        assert repo.run_aggregates(target) == _derived(futures)
        for limit in (1, 5, 20):
            assert [rid for rid, *_ in repo.recent_futures(target, limit)] == _recent(futures, limit)
    assert repo.run_aggregates("no:train:run")["submitted"] == 0


def test_a_store_made_before_the_counters_gets_them_counted_when_opened(repo: Repo) -> None:
    _mixed_history(repo, seed=11)
    expected = {target: _derived(repo.futures_for_target(target)) for target in (RUN, OTHER)}
    with repo.engine.begin() as conn:  # as a store written by a gateway without the counters table
        conn.execute(text("DROP TABLE run_counters"))
        conn.execute(text("DROP INDEX ix_futures_target_completed"))
    with reopened(repo) as again:
        assert {target: again.run_aggregates(target) for target in (RUN, OTHER)} == expected
        again.insert_future(_future("after", RUN, 10_000, FutureState.PENDING, time.time() + 1e4))
        assert again.run_aggregates(RUN) == _derived(again.futures_for_target(RUN))
        assert again.recent_futures(RUN, 1)[0][0] == "after"
