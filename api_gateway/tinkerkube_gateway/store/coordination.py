"""Queries that let several gateway replicas share one database (a mixin of `Repo`).

- Run leases: exactly one replica dispatches a run. A lease is taken when absent or expired (or by
  force on SQLite, where the one gateway process is the only replica), renewed by heartbeat, and every
  takeover bumps its `epoch`. `assign_trainer_seq` is the fence: the op log gets a trainer seq only
  while the writer still holds the lease at its epoch (the lease row is share-locked in the same
  transaction, so a takeover waits for it and then sees the assignment).
- Futures aggregates: counted in `run_counters` in the very transactions that insert and finish each
  future (`count_inserted_in`, `count_finished_in`), so they are right after a restart and on every
  replica, and reading them costs one keyed row however long the run. The sampler reference count is
  derived from the rows themselves.
- `notify`: PostgreSQL NOTIFY on the gateway's channel (no-op on SQLite).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Engine,
    bindparam,
    case,
    cast,
    delete,
    distinct,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from tinkerkube_gateway.store import tables as t
from tinkerkube_gateway.store.records import LIVE, FutureState, SessionStatus

CHANNEL = "tinkerkube_gateway"
SAMPLE_LEASE = "sample:"  # + request_id: the replica running a sample (model ids start with a session id)

# Statements run per op or per mirror flush, built once (see repo.py: building one costs more than running it).
_lease, _f = t.run_leases.c, t.futures.c
_LEASE_HELD = (select(_lease.epoch)
               .where(_lease.model_id == bindparam("b_model_id"), _lease.owner == bindparam("b_owner"),
                      _lease.epoch == bindparam("b_epoch"))
               .with_for_update(read=True))
_SET_TRAINER_SEQ = (update(t.futures).where(_f.request_id == bindparam("b_request_id"))
                    .values(trainer_seq=bindparam("b_trainer_seq")))
_rc = t.run_counters.c
_RUN_COUNTERS = select(t.run_counters).where(_rc.target_id == bindparam("b_target_id"))
_changed = func.coalesce(_f.completed_at, _f.created_at)
_RECENT_DONE = (select(_f.request_id, _f.op, _f.seq_id, _f.state, _f.completed_at.label("changed"))
                .where(_f.target_id == bindparam("b_target_id"), _f.completed_at.is_not(None))
                .order_by(_f.completed_at.desc()).limit(bindparam("b_limit")))
_RECENT_PENDING = (select(_f.request_id, _f.op, _f.seq_id, _f.state, _f.created_at.label("changed"))
                   .where(_f.target_id == bindparam("b_target_id"), _f.state == FutureState.PENDING)
                   .order_by(_f.created_at.desc()).limit(bindparam("b_limit")))
_done = _f.state != FutureState.PENDING
_BACKFILL_COUNTERS = insert(t.run_counters).from_select(
    ["target_id", "submitted", "completed", "failed", "last_seq_id", "last_completed_seq_id"],
    select(_f.target_id, func.count(), func.sum(case((_f.state == FutureState.COMPLETE, 1), else_=0)),
           func.sum(case((_f.state == FutureState.FAILED, 1), else_=0)), func.max(_f.seq_id),
           func.max(case((_done, _f.seq_id), else_=None))).group_by(_f.target_id))


def _greater(current: Any, value: Any) -> Any:
    """max(current, value) ignoring NULLs, in SQL both dialects speak (SQLite max() / PostgreSQL greatest())."""
    return case((current.is_(None), value), (value.is_(None), current), (current < value, value), else_=current)


def _count_insert(dialect: Any) -> Any:
    row = dialect.insert(t.run_counters).values(
        target_id=bindparam("b_target_id"), submitted=1, completed=bindparam("b_completed"),
        failed=bindparam("b_failed"), last_seq_id=bindparam("b_seq_id"), last_completed_seq_id=bindparam("b_done_seq"))
    new = row.excluded
    return row.on_conflict_do_update(index_elements=[_rc.target_id], set_={
        "submitted": _rc.submitted + 1, "completed": _rc.completed + new.completed, "failed": _rc.failed + new.failed,
        "last_seq_id": _greater(_rc.last_seq_id, new.last_seq_id),
        "last_completed_seq_id": _greater(_rc.last_completed_seq_id, new.last_completed_seq_id)})


_COUNT_INSERTED = {"sqlite": _count_insert(sqlite), "postgresql": _count_insert(postgresql)}
_done_seq = cast(bindparam("b_seq_id"), BigInteger)  # typed: PostgreSQL cannot type a bare NULL parameter
_COUNT_FINISHED = (update(t.run_counters).where(_rc.target_id == bindparam("b_target_id"))
                   .values(completed=_rc.completed + bindparam("b_completed"),
                           failed=_rc.failed + bindparam("b_failed"),
                           last_completed_seq_id=_greater(_rc.last_completed_seq_id, _done_seq)))


def create_counters_in(conn: Any) -> None:
    """Creates `run_counters` and counts the futures already stored, in one transaction (a store made
    before the table existed, or a new one)."""
    t.run_counters.create(conn)
    conn.execute(_BACKFILL_COUNTERS)


class CoordinationQueries:
    engine: Engine

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    # --- run leases -----------------------------------------------------------------------------------
    def claim_lease(self, model_id: str, owner: str, now: float, ttl: float, *, force: bool = False) -> int | None:
        """The new epoch when `owner` now holds the run's lease, None when another replica holds it."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(t.run_leases).values(model_id=model_id, owner=owner, epoch=1,
                                                         expires_at=now + ttl))
            return 1
        except IntegrityError:
            pass
        lease = t.run_leases.c
        stmt = update(t.run_leases).where(lease.model_id == model_id)
        if not force:
            stmt = stmt.where(or_(lease.expires_at < now, lease.owner == owner))
        with self.engine.begin() as conn:
            if conn.execute(stmt.values(owner=owner, epoch=lease.epoch + 1, expires_at=now + ttl)).rowcount == 0:
                return None
            return int(conn.execute(select(lease.epoch).where(lease.model_id == model_id)).scalar_one())

    def renew_leases(self, owner: str, now: float, ttl: float) -> dict[str, int]:
        """Extends every lease `owner` holds; returns what it holds (model id → epoch)."""
        lease = t.run_leases.c
        with self.engine.begin() as conn:
            conn.execute(update(t.run_leases).where(lease.owner == owner).values(expires_at=now + ttl))
            rows = conn.execute(select(lease.model_id, lease.epoch).where(lease.owner == owner))
            return {r.model_id: int(r.epoch) for r in rows}

    def release_lease(self, model_id: str, owner: str, epoch: int | None = None) -> None:
        stmt = delete(t.run_leases).where(t.run_leases.c.model_id == model_id, t.run_leases.c.owner == owner)
        if epoch is not None:
            stmt = stmt.where(t.run_leases.c.epoch == epoch)
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def lease_of(self, model_id: str) -> tuple[str, int, float] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(t.run_leases).where(t.run_leases.c.model_id == model_id)).first()
        return None if row is None else (row.owner, int(row.epoch), float(row.expires_at))

    def orphaned_runs(self, now: float) -> list[str]:
        """Live runs whose lease is missing or expired: a replica stopped or died while dispatching them."""
        m, lease = t.models.c, t.run_leases.c
        stmt = (select(m.model_id).select_from(t.models.outerjoin(t.run_leases, lease.model_id == m.model_id))
                .where(m.status.in_(LIVE), or_(lease.model_id.is_(None), lease.expires_at < now)))
        with self.engine.connect() as conn:
            return [r.model_id for r in conn.execute(stmt)]

    def orphaned_samples(self, now: float) -> list[str]:
        """Lease keys of samples whose replica stopped renewing them (it died while they ran)."""
        lease = t.run_leases.c
        stmt = select(lease.model_id).where(lease.model_id.like(SAMPLE_LEASE + "%"), lease.expires_at < now)
        with self.engine.connect() as conn:
            return [r.model_id for r in conn.execute(stmt)]

    def assign_trainer_seq(self, request_id: str, trainer_seq: int | None, *, model_id: str, owner: str,
                           epoch: int) -> bool:
        """Records the op's trainer seq only while `owner` holds the run at `epoch` (the fence)."""
        with self.engine.begin() as conn:
            if conn.execute(_LEASE_HELD, {"b_model_id": model_id, "b_owner": owner, "b_epoch": epoch}).first() is None:
                return False
            conn.execute(_SET_TRAINER_SEQ, {"b_request_id": request_id, "b_trainer_seq": trainer_seq})
            return True

    # --- notifications --------------------------------------------------------------------------------
    def notify(self, payload: str) -> None:
        if self.is_postgres:
            with self.engine.begin() as conn:
                conn.execute(select(func.pg_notify(literal(CHANNEL), literal(payload))))

    def notify_in(self, conn: Any, payload: str | None) -> None:
        """Within a write's transaction: delivered to listeners when (and only if) it commits."""
        if payload is not None and self.is_postgres:
            conn.execute(select(func.pg_notify(literal(CHANNEL), literal(payload))))

    # --- derived aggregates ---------------------------------------------------------------------------
    def count_inserted_in(self, conn: Any, target_id: str, seq_id: int | None, state: FutureState) -> None:
        """Within a future's insert: count it (a future may be stored already finished: a refused op)."""
        done = state != FutureState.PENDING
        conn.execute(_COUNT_INSERTED[self.engine.dialect.name], {
            "b_target_id": target_id, "b_completed": int(state == FutureState.COMPLETE),
            "b_failed": int(state == FutureState.FAILED), "b_seq_id": seq_id, "b_done_seq": seq_id if done else None})

    def count_finished_in(self, conn: Any, target_id: str, seq_id: int | None, state: FutureState) -> None:
        """Within a pending future's completion: count it."""
        conn.execute(_COUNT_FINISHED, {"b_target_id": target_id, "b_completed": int(state == FutureState.COMPLETE),
                                       "b_failed": int(state == FutureState.FAILED), "b_seq_id": seq_id})

    def run_aggregates(self, target_id: str) -> dict[str, int]:
        with self.engine.connect() as conn:
            row = conn.execute(_RUN_COUNTERS, {"b_target_id": target_id}).first()
        if row is None:
            return {"submitted": 0, "completed": 0, "failed": 0, "pending": 0, "last_seq_id": 0,
                    "last_completed_seq_id": 0}
        total, complete, failed = int(row.submitted), int(row.completed), int(row.failed)
        return {"submitted": total, "completed": complete, "failed": failed, "pending": total - complete - failed,
                "last_seq_id": int(row.last_seq_id or 0), "last_completed_seq_id": int(row.last_completed_seq_id or 0)}

    def recent_futures(self, target_id: str, limit: int) -> list[tuple[str, str, int | None, str, float]]:
        """(request_id, op, seq_id, state, changed_at), the `limit` most recently changed, oldest first. A
        future changed last when it finished, or, still pending, when it was created: the newest of each
        kind, from two index range scans, merged."""
        params = {"b_target_id": target_id, "b_limit": limit}
        with self.engine.connect() as conn:
            rows = [(r.request_id, r.op, r.seq_id, r.state, float(r.changed))
                    for stmt in (_RECENT_DONE, _RECENT_PENDING) for r in conn.execute(stmt, params)]
        rows.sort(key=lambda row: row[4], reverse=True)
        return rows[:limit][::-1]

    def sampler_users(self, backing_model_id: str) -> int:
        """Active sessions holding a sampling client on a (shared) sampler process."""
        s = t.samplers.c
        stmt = (select(func.count(distinct(s.session_id)))
                .select_from(t.samplers.join(t.sessions, t.sessions.c.session_id == s.session_id))
                .where(s.backing_model_id == backing_model_id, t.sessions.c.status == SessionStatus.ACTIVE))
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())
