"""Queries behind the account endpoints (a mixin of `Repo`): sampling-session clone ids, revoked API keys,
the audit log and usage records.

Each is a plain row in the shared store, so what one replica writes every other one reads: a clone id is
a counter upsert (the same as the completion log's serials), a revocation is a row that every replica
loads, an audit or usage record is appended in the transaction of the change it records. Both age out by the
retention settings (services/retention.py): `prune_*_before` delete the oldest rows, a bounded batch a call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, Connection, Engine, Table, delete, func, insert, select
from sqlalchemy.exc import IntegrityError

from tinkerkube_gateway.store import tables as t

HOUR = 3600


@dataclass(frozen=True, slots=True)
class AuditRow:
    at: float
    event: str
    category: str
    details: dict[str, Any]


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Use summed over one UTC hour bucket."""

    hour: int  # hours since the epoch
    session_id: str | None
    target_id: str
    kind: str
    quantity: int


@dataclass(frozen=True, slots=True)
class Usage:
    """What a finished op used, recorded with its completion (`finish_future`)."""

    tenant: str
    session_id: str | None
    target_id: str
    items: tuple[tuple[str, int], ...]  # (kind, quantity)


class LedgerQueries:
    engine: Engine

    bump_counter_in: Callable[[Connection, Table, str], int]  # ProtocolQueries

    # --- join_sampling_session ------------------------------------------------------------------------
    def next_clone(self, sampler_id: str) -> int:
        """A clone id of `sampler_id` no caller got before: 1, 2, ... (0 is the original client)."""
        with self.engine.begin() as conn:
            return self.bump_counter_in(conn, t.sampling_clone_counters, sampler_id)

    # --- revoked API keys -----------------------------------------------------------------------------
    def revoke_key(self, fingerprint: str, tenant: str, now: float, audit: dict[str, Any]) -> bool:
        """Revoke a key by fingerprint, with its audit record in the same commit. False: revoked before."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(t.revoked_keys).values(fingerprint=fingerprint, tenant=tenant, revoked_at=now))
                self.audit_in(conn, tenant, now, "api_key_revoke", "organizations", audit)
        except IntegrityError:
            return False
        return True

    def revoked_fingerprints(self) -> set[str]:
        with self.engine.connect() as conn:
            return {r[0] for r in conn.execute(select(t.revoked_keys.c.fingerprint))}

    # --- audit log ------------------------------------------------------------------------------------
    def audit_in(self, conn: Connection, tenant: str, now: float, event: str, category: str,
                 details: dict[str, Any]) -> None:
        conn.execute(insert(t.audit_events).values(tenant=tenant, at=now, event=event, category=category,
                                                   details=details))

    def audit(self, tenant: str, now: float, event: str, category: str, details: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            self.audit_in(conn, tenant, now, event, category, details)

    def audit_events(self, tenant: str, start: float, end: float, categories: list[str] | None,
                     limit: int) -> list[AuditRow]:
        a = t.audit_events.c
        stmt = select(a.at, a.event, a.category, a.details).where(a.tenant == tenant, a.at >= start, a.at < end)
        if categories is not None:
            stmt = stmt.where(a.category.in_(categories))
        stmt = stmt.order_by(a.at, a.id).limit(limit)
        with self.engine.connect() as conn:
            return [AuditRow(float(r.at), r.event, r.category, dict(r.details or {})) for r in conn.execute(stmt)]

    # --- usage ----------------------------------------------------------------------------------------
    def record_usage_in(self, conn: Connection, usage: Usage, now: float) -> None:
        rows = [{"tenant": usage.tenant, "session_id": usage.session_id, "target_id": usage.target_id,
                 "kind": kind, "quantity": quantity, "hour": int(now // HOUR)}
                for kind, quantity in usage.items if quantity > 0]
        if rows:
            conn.execute(insert(t.usage_events), rows)

    def usage_buckets(self, tenant: str, first_hour: int, end_hour: int) -> list[UsageRow]:
        """The tenant's usage summed per (hour, session, target, kind), hours in [first_hour, end_hour)."""
        u = t.usage_events.c
        stmt = (select(u.hour, u.session_id, u.target_id, u.kind, func.sum(u.quantity))
                .where(u.tenant == tenant, u.hour >= first_hour, u.hour < end_hour)
                .group_by(u.hour, u.session_id, u.target_id, u.kind).order_by(u.hour))
        with self.engine.connect() as conn:
            return [UsageRow(int(r[0]), r[1], r[2], r[3], int(r[4])) for r in conn.execute(stmt)]

    # --- retention ------------------------------------------------------------------------------------
    def prune_audit_before(self, cutoff: float, batch: int) -> int:
        """Delete at most `batch` audit rows recorded before `cutoff` (epoch seconds); how many went."""
        return self._prune(t.audit_events, t.audit_events.c.at, cutoff, batch)

    def prune_usage_before(self, cutoff_hour: int, batch: int) -> int:
        """Delete at most `batch` usage rows of hour buckets before `cutoff_hour`; how many went."""
        return self._prune(t.usage_events, t.usage_events.c.hour, cutoff_hour, batch)

    def _prune(self, table: Table, at: Column[Any], cutoff: float, batch: int) -> int:
        """One short transaction over the time index (ix_audit_at, ix_usage_hour): the oldest `batch` ids,
        then those rows. Idempotent, so replicas sharing the store may prune at once: a row another one
        deleted first is simply not counted here."""
        oldest = select(table.c.id).where(at < cutoff).order_by(at).limit(batch)
        with self.engine.begin() as conn:
            return conn.execute(delete(table).where(table.c.id.in_(oldest))).rowcount
