"""POST /sessions/search: the tenant's sessions, newest first, filtered the way the SDK's
`SessionSearchRequest` describes, one page at a time (tinker.types SessionSearchResponse).

A tenant is one owner here: "own" and "accessible" both mean the tenant's sessions, "user" matches when
the tenant's name is among `owner_urns`. Sessions created without a project are in `DEFAULT_PROJECT`.
Statuses: a running session is `active`; one its client finished is `client_finished` with the reason
the client sent; one reaped for missing heartbeats has no status (the SDK's "neither finished nor known
to be running"). This gateway never cancels or fails a session, so those two queries match nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tinkerkube_gateway.schemas import SessionSearchRequest, SessionStatusQuery
from tinkerkube_gateway.services.registry import iso
from tinkerkube_gateway.store.protocol import SessionExtras
from tinkerkube_gateway.store.records import SessionRecord, SessionStatus
from tinkerkube_gateway.store.repo import AsyncRepo

DEFAULT_PROJECT = "default"
_SCAN = 500  # sessions read per query while a page fills (most filters are applied in Python)


def status_of(session: SessionRecord, extras: SessionExtras | None) -> dict[str, Any] | None:
    if session.status == SessionStatus.ACTIVE:
        return {"type": "active"}
    reason = extras.finish_reason if extras is not None else None
    if session.status == SessionStatus.FINISHED and reason is not None:
        return {"type": "client_finished", "reason": {"type": reason}, "detail": None}
    return None


def _status_matches(status: dict[str, Any] | None, queries: list[SessionStatusQuery] | None) -> bool:
    if queries is None:
        return True
    if status is None:
        return False
    for query in queries:
        if query.type == status["type"] and (query.type != "client_finished" or query.reasons is None
                                             or status["reason"]["type"] in query.reasons):
            return True
    return False


def _name_matches(name: str | None, query: str) -> bool:
    text = (name or "").casefold()
    return all(word in text for word in query.casefold().split())


def matches(session: SessionRecord, extras: SessionExtras | None, req: SessionSearchRequest) -> bool:
    """The filters not applied in SQL (`session_id` alone and `project_ids` are)."""
    if req.display_name is not None:
        by_id = req.session_id is not None and session.session_id == req.session_id
        if not (by_id or _name_matches(session.display_name, req.display_name)):
            return False
    metadata = session.user_metadata or {}
    if any(str(metadata.get(key)) != value or key not in metadata for key, value in req.user_metadata.items()):
        return False
    return _status_matches(status_of(session, extras), req.statuses)


class SessionSearch:
    def __init__(self, repo: AsyncRepo):
        self.repo = repo

    async def search(self, tenant: str, req: SessionSearchRequest) -> dict[str, Any]:
        if req.owner.type == "user" and tenant not in (req.owner.owner_urns or []):
            return {"sessions": [], "next_cursor": None}
        before = await self._after(tenant, req)
        by_id = req.session_id if req.display_name is None else None  # with a name, either one matches
        found: list[tuple[SessionRecord, SessionExtras | None]] = []
        more = True
        while more and len(found) < req.limit:
            batch = await self.repo.search_sessions(tenant, session_id=by_id, before=before,
                                                    project_ids=req.project_ids, default_project=DEFAULT_PROJECT,
                                                    limit=_SCAN)
            extras = await self.repo.session_extras([s.session_id for s in batch]) if batch else {}
            more = len(batch) == _SCAN
            for i, session in enumerate(batch):
                before = (session.created_at, session.session_id)
                if matches(session, extras.get(session.session_id), req):
                    found.append((session, extras.get(session.session_id)))
                    if len(found) == req.limit:
                        more = more or i < len(batch) - 1
                        break
        storage = await self.repo.session_storage([s.session_id for s, _ in found]) if found else {}
        page = [self._summary(tenant, s, x, storage.get(s.session_id)) for s, x in found]
        last = found[-1][0] if found and more else None
        cursor = None if last is None else {"last_created_at": datetime.fromtimestamp(last.created_at, UTC).isoformat(),
                                            "last_session_id": last.session_id}
        return {"sessions": page, "next_cursor": cursor}

    async def _after(self, tenant: str, req: SessionSearchRequest) -> tuple[float, str] | None:
        """Where the page starts. The session the cursor names gives its exact creation time (the cursor's
        datetime has microseconds only); a cursor naming no session of the tenant uses its datetime."""
        if req.cursor is None:
            return None
        named = await self.repo.get_session(req.cursor.last_session_id)
        if named is not None and named.tenant == tenant:
            return named.created_at, named.session_id
        return req.cursor.last_created_at.timestamp(), req.cursor.last_session_id

    @staticmethod
    def _summary(tenant: str, session: SessionRecord, extras: SessionExtras | None, storage: Any) -> dict[str, Any]:
        metadata = None if session.user_metadata is None else {k: str(v) for k, v in session.user_metadata.items()}
        return {"session_id": session.session_id, "created_at": iso(session.created_at), "owner": tenant,
                "project_id": (extras.project_id if extras is not None else None) or DEFAULT_PROJECT,
                "status": status_of(session, extras), "checkpoints_count": storage.checkpoints if storage else 0,
                "display_name": session.display_name, "user_metadata": metadata,
                "checkpoint_storage_bytes": storage.size_bytes if storage else 0}
