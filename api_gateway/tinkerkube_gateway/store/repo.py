"""Queries over the tables: one implementation for SQLite and PostgreSQL (SQLAlchemy 2 Core).

`Repo` is synchronous; `AsyncRepo` runs each call in a worker thread so the event loop never blocks on
the database. The `(target_id, seq_id)` unique constraint makes a retried submit safe: the second insert
fails and the original future is returned (`insert_future` → `(record, created=False)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, bindparam, create_engine, delete, event, func, insert, inspect, select, text, update
from sqlalchemy.exc import IntegrityError

from tinkerkube_contract.resource import SessionMode
from tinkerkube_gateway.store import tables as t
from tinkerkube_gateway.store.coordination import CoordinationQueries, create_counters_in
from tinkerkube_gateway.store.ledger import LedgerQueries, Usage
from tinkerkube_gateway.store.protocol import EventTarget, ProtocolQueries
from tinkerkube_gateway.store.records import (
    LIVE,
    CheckpointRecord,
    CustomLossRecord,
    FutureOp,
    FutureRecord,
    FutureState,
    ModelRecord,
    ModelStatus,
    SamplerRecord,
    SessionRecord,
    SessionStatus,
)

# The op path's statements, built once. SQLAlchemy caches a statement's compiled form by its cache key, but
# building a statement (and its key) with its values inline costs more CPU than the database call itself
# (~0.5-1 ms a call on a small machine, measured); built once with bound parameters, only the values change.
_INSERT_FUTURE = insert(t.futures)
_GET_MODEL = select(t.models).where(t.models.c.model_id == bindparam("b_model_id"))
_GET_FUTURE = select(t.futures).where(t.futures.c.request_id == bindparam("b_request_id"))
_FINISH_FUTURE = (update(t.futures)
                  .where(t.futures.c.request_id == bindparam("b_request_id"), t.futures.c.state == FutureState.PENDING)
                  .values(state=bindparam("b_state"), result=bindparam("b_result"),
                          result_type=bindparam("b_result_type"), error=bindparam("b_error"),
                          category=bindparam("b_category"), completed_at=bindparam("b_now"))
                  .returning(t.futures.c.target_id, t.futures.c.seq_id))
_TOUCH_MODEL = (update(t.models).where(t.models.c.model_id == bindparam("b_model_id"))
                .values(last_request_time=bindparam("b_now")))


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def widen_seq_ids(engine: Engine) -> None:
    """PostgreSQL stores made when `futures.seq_id` was INTEGER: make it BIGINT (sample seq_ids of unpickled
    SamplingClients pass 2^31). SQLite's INTEGER is 64-bit already."""
    if engine.dialect.name != "postgresql":
        return
    with engine.begin() as conn:
        kind = conn.execute(text("SELECT data_type FROM information_schema.columns WHERE table_name = 'futures' "
                                 "AND column_name = 'seq_id' AND table_schema = current_schema()")).scalar()
        if kind == "integer":
            conn.execute(text("ALTER TABLE futures ALTER COLUMN seq_id TYPE BIGINT"))


class Repo(CoordinationQueries, ProtocolQueries, LedgerQueries):
    def __init__(self, url: str):
        self.engine = make_engine(url)
        t.metadata.create_all(self.engine, tables=[tb for tb in t.metadata.sorted_tables if tb is not t.run_counters])
        for index in t.LATER_INDEXES:  # create_all skips the indexes of tables that exist
            index.create(self.engine, checkfirst=True)
        with self.engine.begin() as conn:
            if not inspect(conn).has_table(t.run_counters.name):
                create_counters_in(conn)
        widen_seq_ids(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def _one(self, stmt: Any, cls: Any, params: dict[str, Any] | None = None) -> Any:
        with self.engine.connect() as conn:
            row = conn.execute(stmt, params).first()
        return None if row is None else cls.from_row(row)

    def _all(self, stmt: Any, cls: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return [cls.from_row(r) for r in conn.execute(stmt)]

    def _write(self, stmt: Any) -> int:
        with self.engine.begin() as conn:
            return conn.execute(stmt).rowcount

    # --- sessions -------------------------------------------------------------------------------
    def insert_session(self, **values: Any) -> None:
        self._write(insert(t.sessions).values(**values))

    def get_session(self, session_id: str) -> SessionRecord | None:
        return self._one(select(t.sessions).where(t.sessions.c.session_id == session_id), SessionRecord)

    def heartbeat(self, session_id: str, now: float) -> None:
        self._write(update(t.sessions).where(t.sessions.c.session_id == session_id).values(last_heartbeat=now))

    def end_session(self, session_id: str, status: SessionStatus, reason: str) -> bool:
        stmt = (update(t.sessions).where(t.sessions.c.session_id == session_id)
                .where(t.sessions.c.status == SessionStatus.ACTIVE).values(status=status, ended_reason=reason))
        return self._write(stmt) > 0

    def list_sessions(self, tenant: str, limit: int, offset: int) -> list[SessionRecord]:
        stmt = (select(t.sessions).where(t.sessions.c.tenant == tenant)
                .order_by(t.sessions.c.created_at.desc()).limit(limit).offset(offset))
        return self._all(stmt, SessionRecord)

    def idle_sessions(self, cutoff: float) -> list[SessionRecord]:
        stmt = select(t.sessions).where(t.sessions.c.status == SessionStatus.ACTIVE,
                                        t.sessions.c.last_heartbeat < cutoff)
        return self._all(stmt, SessionRecord)

    def count_active_sessions(self) -> int:
        with self.engine.connect() as conn:
            stmt = select(func.count()).select_from(t.sessions).where(t.sessions.c.status == SessionStatus.ACTIVE)
            return int(conn.execute(stmt).scalar_one())

    # --- models (trainer process groups) ---------------------------------------------------------
    def insert_model(self, **values: Any) -> bool:
        try:
            self._write(insert(t.models).values(**values))
            return True
        except IntegrityError:
            return False

    def get_model(self, model_id: str) -> ModelRecord | None:
        return self._one(_GET_MODEL, ModelRecord, {"b_model_id": model_id})

    def update_model(self, model_id: str, **values: Any) -> None:
        self._write(update(t.models).where(t.models.c.model_id == model_id).values(**values))

    def list_models(self, *, tenant: str | None = None, session_id: str | None = None, kind: SessionMode | None = None,
                    live_only: bool = False, limit: int = 1000, offset: int = 0) -> list[ModelRecord]:
        stmt = select(t.models)
        if tenant is not None:
            stmt = stmt.where(t.models.c.tenant == tenant)
        if session_id is not None:
            stmt = stmt.where(t.models.c.session_id == session_id)
        if kind is not None:
            stmt = stmt.where(t.models.c.kind == kind)
        if live_only:
            stmt = stmt.where(t.models.c.status.in_(LIVE))
        stmt = stmt.order_by(t.models.c.created_at.desc()).limit(limit).offset(offset)
        return self._all(stmt, ModelRecord)

    def count_models(self, tenant: str, kind: SessionMode) -> int:
        with self.engine.connect() as conn:
            stmt = select(func.count()).select_from(t.models).where(t.models.c.tenant == tenant,
                                                                    t.models.c.kind == kind)
            return int(conn.execute(stmt).scalar_one())

    def find_sampler_process(self, tenant: str, weights_key: str) -> ModelRecord | None:
        stmt = select(t.models).where(t.models.c.tenant == tenant, t.models.c.kind == SessionMode.SAMPLE,
                                      t.models.c.weights_key == weights_key, t.models.c.status.in_(LIVE))
        return self._one(stmt, ModelRecord)

    # --- samplers ---------------------------------------------------------------------------------
    def insert_sampler(self, **values: Any) -> bool:
        try:
            self._write(insert(t.samplers).values(**values))
            return True
        except IntegrityError:
            return False

    def get_sampler(self, sampler_id: str) -> SamplerRecord | None:
        return self._one(select(t.samplers).where(t.samplers.c.sampler_id == sampler_id), SamplerRecord)

    def list_samplers(self, session_id: str) -> list[SamplerRecord]:
        stmt = select(t.samplers).where(t.samplers.c.session_id == session_id).order_by(t.samplers.c.created_at)
        return self._all(stmt, SamplerRecord)

    # --- custom losses ---------------------------------------------------------------------------
    def insert_custom_loss(self, record: CustomLossRecord) -> None:
        """Idempotent: a replayed create (same loss_id) leaves the first row."""
        with contextlib.suppress(IntegrityError):
            self._write(insert(t.custom_losses).values(**{f: getattr(record, f) for f in record.__slots__}))

    def get_custom_loss(self, loss_id: str) -> CustomLossRecord | None:
        return self._one(select(t.custom_losses).where(t.custom_losses.c.loss_id == loss_id), CustomLossRecord)

    # --- futures and the op log -------------------------------------------------------------------
    def insert_future(self, record: FutureRecord) -> tuple[FutureRecord, bool]:
        values = {f: getattr(record, f) for f in record.__slots__}
        try:
            with self.engine.begin() as conn:
                conn.execute(_INSERT_FUTURE, values)
                self.count_inserted_in(conn, record.target_id, record.seq_id, record.state)
            return record, True
        except IntegrityError:
            existing = None
            if record.seq_id is not None:
                existing = self._one(select(t.futures).where(t.futures.c.target_id == record.target_id,
                                                             t.futures.c.seq_id == record.seq_id), FutureRecord)
            if existing is None:
                raise
            return existing, False

    def insert_op_future(self, record: FutureRecord, *, kind: SessionMode,
                         now: float) -> tuple[ModelRecord | None, FutureRecord | None, bool]:
        """A training op's submit in one call (one worker-thread hop): the run, None unless it is
        `record.tenant`'s and of `kind` (then nothing is written); the future inserted idempotently under
        the run's session (`insert_future`); for a new op on a live run, its `last_request_time` (shown by
        the REST API only, so written at most once a second: one statement less on most submits)."""
        model = self.get_model(record.target_id)
        if model is None or model.tenant != record.tenant or model.kind != kind:
            return None, None, False
        stored, created = self.insert_future(dataclasses.replace(record, session_id=model.session_id))
        if (created and model.status not in (ModelStatus.FAILED, ModelStatus.STOPPED)
                and now - model.last_request_time >= 1.0):
            with self.engine.begin() as conn:
                conn.execute(_TOUCH_MODEL, {"b_model_id": model.model_id, "b_now": now})
        return model, stored, created

    def get_future(self, request_id: str) -> FutureRecord | None:
        return self._one(_GET_FUTURE, FutureRecord, {"b_request_id": request_id})

    def finish_future(self, request_id: str, *, state: FutureState, now: float, result: bytes | None = None,
                      result_type: str | None = None, error: str | None = None, category: str | None = None,
                      notify: str | None = None, event: EventTarget | None = None,
                      usage: Usage | None = None) -> bool:
        """Only a pending future changes: a second completion (a replay, a race) is ignored. `notify`:
        a NOTIFY payload sent with the change's commit (PostgreSQL); `event`: log the completion for
        retrieve_futures in the same commit; `usage`: what the op used, recorded in the same commit (once)."""
        params = {"b_request_id": request_id, "b_state": state, "b_result": result, "b_result_type": result_type,
                  "b_error": error, "b_category": category, "b_now": now}
        with self.engine.begin() as conn:
            row = conn.execute(_FINISH_FUTURE, params).first()
            changed = row is not None
            if changed:
                self.count_finished_in(conn, row.target_id, row.seq_id, state)
                if event is not None:
                    self.record_event_in(conn, event, request_id, state, now)
                if usage is not None:
                    self.record_usage_in(conn, usage, now)
                self.notify_in(conn, notify)
        return changed

    def set_trainer_seq(self, request_id: str, trainer_seq: int | None) -> None:
        self._write(update(t.futures).where(t.futures.c.request_id == request_id).values(trainer_seq=trainer_seq))

    def max_trainer_seq(self, target_id: str) -> int:
        with self.engine.connect() as conn:
            stmt = select(func.max(t.futures.c.trainer_seq)).where(t.futures.c.target_id == target_id)
            return int(conn.execute(stmt).scalar_one() or 0)

    def futures_after_trainer_seq(self, target_id: str, after: int) -> list[FutureRecord]:
        stmt = (select(t.futures).where(t.futures.c.target_id == target_id, t.futures.c.trainer_seq > after)
                .order_by(t.futures.c.trainer_seq))
        return self._all(stmt, FutureRecord)

    def futures_for_target(self, target_id: str, *, after_seq: int | None = None,
                           pending_only: bool = False) -> list[FutureRecord]:
        stmt = select(t.futures).where(t.futures.c.target_id == target_id)
        if after_seq is not None:
            stmt = stmt.where(t.futures.c.seq_id > after_seq)
        if pending_only:
            stmt = stmt.where(t.futures.c.state == FutureState.PENDING)
        return self._all(stmt.order_by(t.futures.c.seq_id, t.futures.c.created_at), FutureRecord)

    def futures_for_session(self, session_id: str, limit: int = 100_000) -> list[FutureRecord]:
        """A session's requests in submit order, without their bodies and results (the trace export)."""
        columns = [c for c in t.futures.c if c.name not in ("body", "result")]
        stmt = (select(*columns).where(t.futures.c.session_id == session_id)
                .order_by(t.futures.c.created_at).limit(limit))
        with self.engine.connect() as conn:
            return [FutureRecord(**{**dict(r._mapping), "body": None, "result": None,
                                    "op": FutureOp(r.op), "state": FutureState(r.state)}) for r in conn.execute(stmt)]

    def pending_futures(self) -> list[FutureRecord]:
        stmt = select(t.futures).where(t.futures.c.state == FutureState.PENDING).order_by(t.futures.c.created_at)
        return self._all(stmt, FutureRecord)

    def count_pending(self) -> int:
        with self.engine.connect() as conn:
            stmt = select(func.count()).select_from(t.futures).where(t.futures.c.state == FutureState.PENDING)
            return int(conn.execute(stmt).scalar_one())

    # --- checkpoints ------------------------------------------------------------------------------
    def upsert_checkpoint(self, record: CheckpointRecord) -> None:
        values = {f: getattr(record, f) for f in record.__slots__}
        with self.engine.begin() as conn:
            conn.execute(delete(t.checkpoints).where(t.checkpoints.c.tinker_path == record.tinker_path))
            conn.execute(insert(t.checkpoints).values(**values))

    def get_checkpoint(self, tinker_path: str) -> CheckpointRecord | None:
        return self._one(select(t.checkpoints).where(t.checkpoints.c.tinker_path == tinker_path), CheckpointRecord)

    def list_checkpoints(self, *, tenant: str, run_id: str | None = None, limit: int = 1000,
                         offset: int = 0) -> list[CheckpointRecord]:
        stmt = select(t.checkpoints).where(t.checkpoints.c.tenant == tenant)
        if run_id is not None:
            stmt = stmt.where(t.checkpoints.c.run_id == run_id)
        stmt = stmt.order_by(t.checkpoints.c.created_at.desc()).limit(limit).offset(offset)
        return self._all(stmt, CheckpointRecord)

    def count_checkpoints(self, tenant: str, run_id: str | None = None) -> int:
        stmt = select(func.count()).select_from(t.checkpoints).where(t.checkpoints.c.tenant == tenant)
        if run_id is not None:
            stmt = stmt.where(t.checkpoints.c.run_id == run_id)
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def update_checkpoint(self, tinker_path: str, **values: Any) -> None:
        self._write(update(t.checkpoints).where(t.checkpoints.c.tinker_path == tinker_path).values(**values))

    def delete_checkpoint(self, tinker_path: str) -> bool:
        return self._write(delete(t.checkpoints).where(t.checkpoints.c.tinker_path == tinker_path)) > 0

    def expired_checkpoints(self, now: float) -> list[CheckpointRecord]:
        stmt = select(t.checkpoints).where(t.checkpoints.c.expires_at.is_not(None), t.checkpoints.c.expires_at < now)
        return self._all(stmt, CheckpointRecord)


# The op path's calls: each touches a row or two by key. On SQLite they run on the event loop itself.
INLINE_ON_SQLITE = frozenset({"insert_op_future", "assign_trainer_seq", "finish_future", "get_model", "get_future",
                              "get_session", "heartbeat"})


class AsyncRepo:
    """The same methods as `Repo`, awaited.

    Each call runs in a worker thread so the event loop never waits on a database round trip, except,
    on SQLite, the op path's small keyed calls (`INLINE_ON_SQLITE`): a local SQLite call costs ~0.1-0.3 ms
    of CPU, less than the thread hop around it (the executor's wake-ups and two GIL hand-offs, measured),
    and the gateway is SQLite's only writer. Scans (lists, searches, exports) still run in threads.
    """

    def __init__(self, repo: Repo):
        self.sync = repo
        self._inline = INLINE_ON_SQLITE if repo.engine.dialect.name == "sqlite" else frozenset()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.sync, name)
        if name in self._inline:
            @functools.wraps(method)
            async def inline(*args: Any, **kwargs: Any) -> Any:
                return method(*args, **kwargs)

            return inline

        @functools.wraps(method)
        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return call

    def close(self) -> None:
        self.sync.close()
