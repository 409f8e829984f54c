"""The audit log of a tenant's own state-changing calls (`GET /api/v1/audit`, the admin client's
`get_audit_log`).

Recorded, after the call succeeded: sessions created and finished (`session_create`, `session_finish`),
projects set (`project_set`), runs and samplers created (`model_create`, `sampler_create`), checkpoints
copied, deleted, published, unpublished and given a TTL (`checkpoint_copy`, `checkpoint_delete`,
`checkpoint_publish`, `checkpoint_unpublish`, `checkpoint_ttl_set`), and API keys revoked
(`api_key_revoke`, in the revocation's own commit). Each names the key that made it (`actor_key_id`).

The SDK asks for one UTC day and one resource class (`event_type`): checkpoint events are `checkpoints`,
project events `projects`, the rest `organizations` (a tenant is the organisation here); `teams` has no
events. A day answers at most `MAX_ENTRIES_PER_DAY` entries, oldest first.
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from fastapi import Request

from tinkerkube_gateway.services.keys import Caller, key_id
from tinkerkube_gateway.store.ledger import AuditRow
from tinkerkube_gateway.store.repo import AsyncRepo

MAX_ENTRIES_PER_DAY = 10_000
EventType = Literal["all", "checkpoints", "projects", "teams", "organizations"]
CHECKPOINT_EVENTS_DEPRECATED_FIELDS = ("model_id", "tinker_path")


def category_of(event: str) -> str:
    if event.startswith("checkpoint_"):
        return "checkpoints"
    if event.startswith("project_"):
        return "projects"
    return "organizations"


def entry(row: AuditRow) -> dict[str, Any]:
    """The SDK's `AuditLogEntry`; checkpoint events also fill its deprecated model_id / tinker_path."""
    out: dict[str, Any] = {"timestamp": datetime.fromtimestamp(row.at, UTC).isoformat(), "event": row.event,
                           "event_details": row.details}
    if row.category == "checkpoints":
        for field in CHECKPOINT_EVENTS_DEPRECATED_FIELDS:
            if isinstance(row.details.get(field), str):
                out[field] = row.details[field]
    return out


class AuditLog:
    def __init__(self, repo: AsyncRepo):
        self.repo = repo

    async def record(self, request: Request, tenant: str, event: str, **details: Any) -> None:
        """`event` by the caller of `request` (whose key, from `deps.caller`, is on `request.state`)."""
        caller: Caller | None = getattr(request.state, "caller", None)
        if caller is not None:
            details["actor_key_id"] = key_id(caller.fingerprint)
        await self.repo.audit(tenant, time.time(), event, category_of(event), details)

    async def day(self, tenant: str, event_type: EventType, day: date | None) -> dict[str, Any]:
        day = day or datetime.now(UTC).date()
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        end = start + timedelta(days=1) if day < date.max else start.replace(hour=23, minute=59, second=59)
        categories = None if event_type == "all" else [event_type]
        rows = await self.repo.audit_events(tenant, start.timestamp(), end.timestamp(), categories,
                                            MAX_ENTRIES_PER_DAY)
        return {"entries": [entry(r) for r in rows]}
