"""Queries behind the rest of the Tinker protocol (a mixin of `Repo`): the sample-completion log that
`retrieve_futures` reads, session projects and search, the URL-signing secret.

The completion log is ordered by commit: `record_event_in` runs inside the transaction that finishes the
future and takes the next serial of its sampling session from a counter row with an upsert, which keeps
that row locked until the commit (PostgreSQL), while SQLite runs one writer at a time anyway. So serials
become visible in order, and a poller that has seen serial n can never later miss a smaller one.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Table, and_, delete, func, insert, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from tinkerkube_gateway.store import tables as t
from tinkerkube_gateway.store.records import FutureState, SessionRecord

CLONE_STRIDE = 1_000_000_000  # an unpickled SamplingClient numbers its samples from clone_id * 1e9


@dataclass(frozen=True, slots=True)
class EventTarget:
    """Where a finished sample is logged: its sampling session and the client copy that sent it."""

    target_id: str
    clone: int
    size: int | None


@dataclass(frozen=True, slots=True)
class FutureEvent:
    serial: int
    request_id: str
    state: FutureState
    size: int | None


@dataclass(frozen=True, slots=True)
class SessionExtras:
    project_id: str | None
    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class SessionStorage:
    checkpoints: int
    size_bytes: int


def clone_of(seq_id: int | None) -> int:
    return 0 if seq_id is None or seq_id < 0 else seq_id // CLONE_STRIDE


class ProtocolQueries:
    engine: Engine

    # --- the sample-completion log (retrieve_futures) ----------------------------------------------------
    def record_event_in(self, conn: Connection, event: EventTarget, request_id: str, state: FutureState,
                        now: float) -> None:
        serial = self.bump_counter_in(conn, t.future_event_counters, event.target_id)
        conn.execute(insert(t.future_events).values(target_id=event.target_id, serial=serial, clone=event.clone,
                                                    request_id=request_id, state=state, size=event.size,
                                                    created_at=now))

    def bump_counter_in(self, conn: Connection, counter: Table, target_id: str) -> int:
        """The next value (1, 2, ...) of `target_id`'s row in a (target_id, last) counter table: an upsert
        that keeps the row locked until commit, so concurrent callers (any replica) get distinct values."""
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        upsert = dialect.insert(counter).values(target_id=target_id, last=1)
        return int(conn.execute(upsert.on_conflict_do_update(index_elements=[counter.c.target_id],
                                                             set_={"last": counter.c.last + 1})
                                .returning(counter.c.last)).scalar_one())

    def future_events(self, target_id: str, clone: int, after: int, limit: int = 1000) -> list[FutureEvent]:
        e = t.future_events.c
        stmt = (select(e.serial, e.request_id, e.state, e.size)
                .where(e.target_id == target_id, e.clone == clone, e.serial > after).order_by(e.serial).limit(limit))
        with self.engine.connect() as conn:
            return [FutureEvent(int(r.serial), r.request_id, FutureState(r.state), r.size) for r in conn.execute(stmt)]

    def trim_future_events(self, target_id: str, clone: int, upto: int) -> None:
        e = t.future_events.c
        with self.engine.begin() as conn:
            conn.execute(delete(t.future_events).where(e.target_id == target_id, e.clone == clone, e.serial <= upto))

    def drop_future_events_before(self, cutoff: float, batch: int) -> int:
        """Completions nobody polled for (clients that do not use retrieve_futures) age out: at most `batch`,
        oldest first over the created_at index, so a backlog is worked down in short transactions."""
        e = t.future_events.c
        oldest = select(e.target_id, e.serial).where(e.created_at < cutoff).order_by(e.created_at).limit(batch)
        with self.engine.begin() as conn:
            return conn.execute(delete(t.future_events).where(tuple_(e.target_id, e.serial).in_(oldest))).rowcount

    # --- sessions: project, finish reason, search ---------------------------------------------------------
    def set_session_extras(self, session_id: str, **values: Any) -> None:
        x = t.session_extras
        with self.engine.begin() as conn:
            if conn.execute(update(x).where(x.c.session_id == session_id).values(**values)).rowcount == 0:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(x).values(session_id=session_id, **values))
                except IntegrityError:  # inserted meanwhile by another replica
                    conn.execute(update(x).where(x.c.session_id == session_id).values(**values))

    def session_extras(self, session_ids: list[str]) -> dict[str, SessionExtras]:
        x = t.session_extras.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(x.session_id, x.project_id, x.finish_reason)
                                .where(x.session_id.in_(session_ids)))
            return {r.session_id: SessionExtras(r.project_id, r.finish_reason) for r in rows}

    def search_sessions(self, tenant: str, *, session_id: str | None, before: tuple[float, str] | None,
                        project_ids: list[str] | None, default_project: str, limit: int) -> list[SessionRecord]:
        """The tenant's sessions, newest first (ties by id), strictly after the cursor `before`; filtered
        by exact id and project here, by the rest in the caller (names, metadata, status)."""
        s, x = t.sessions.c, t.session_extras.c
        stmt = select(*t.sessions.c).outerjoin(t.session_extras, x.session_id == s.session_id).where(s.tenant == tenant)
        if session_id is not None:
            stmt = stmt.where(s.session_id == session_id)
        if before is not None:
            stmt = stmt.where(or_(s.created_at < before[0], and_(s.created_at == before[0], s.session_id < before[1])))
        if project_ids is not None:
            project = func.coalesce(x.project_id, default_project)
            stmt = stmt.where(project.in_(project_ids))
        stmt = stmt.order_by(s.created_at.desc(), s.session_id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [SessionRecord.from_row(r) for r in conn.execute(stmt)]

    def session_storage(self, session_ids: list[str]) -> dict[str, SessionStorage]:
        """Checkpoints of each session's runs: how many, and their bytes."""
        m, c = t.models.c, t.checkpoints.c
        stmt = (select(m.session_id, func.count(c.tinker_path), func.coalesce(func.sum(c.size_bytes), 0))
                .select_from(t.checkpoints.join(t.models, m.model_id == c.run_id))
                .where(m.session_id.in_(session_ids)).group_by(m.session_id))
        with self.engine.connect() as conn:
            return {r[0]: SessionStorage(int(r[1]), int(r[2])) for r in conn.execute(stmt)}

    # --- secrets ---------------------------------------------------------------------------------------------
    def shared_secret(self, name: str, size: int = 32) -> bytes:
        """A random secret every replica reads alike, made by whichever asks first."""
        g = t.gateway_secrets.c
        with self.engine.begin() as conn:
            found = conn.execute(select(g.value).where(g.name == name)).scalar_one_or_none()
            if found is not None:
                return bytes(found)
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(t.gateway_secrets).values(name=name, value=secrets.token_bytes(size)))
        except IntegrityError:
            pass  # another replica made it first: read theirs
        with self.engine.connect() as conn:
            return bytes(conn.execute(select(g.value).where(g.name == name)).scalar_one())
