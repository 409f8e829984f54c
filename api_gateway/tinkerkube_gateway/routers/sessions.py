"""REST over sessions: list, describe, search, move into a project, export a trace (§3.5)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from tinkerkube_gateway.deps import Body, Svc, Tenant
from tinkerkube_gateway.routers.common import Limit, Offset, parse
from tinkerkube_gateway.schemas import AssignProjectRequest, SessionSearchRequest

router = APIRouter(prefix="/api/v1", tags=["sessions"])


@router.get("/sessions", summary="The tenant's sessions")
async def list_sessions(svc: Svc, tenant: Tenant, limit: int = Limit, offset: int = Offset) -> dict[str, Any]:
    return {"sessions": await svc.sessions.list_ids(tenant, limit, offset)}


@router.post("/sessions/search", summary="Search the tenant's sessions, newest first (one page)")
async def search_sessions(svc: Svc, tenant: Tenant, body: Body) -> dict[str, Any]:
    return await svc.session_search.search(tenant, parse(body, SessionSearchRequest))


@router.get("/sessions/{session_id}", summary="A session's runs and samplers")
async def get_session(svc: Svc, tenant: Tenant, session_id: str) -> dict[str, Any]:
    return await svc.sessions.describe(tenant, session_id)


@router.put("/sessions/{session_id}/project", summary="Move a session (its runs and samplers) into a project")
async def assign_project(svc: Svc, tenant: Tenant, session_id: str, body: Body, request: Request) -> dict[str, Any]:
    project_id = parse(body, AssignProjectRequest).project_id
    await svc.sessions.assign_project(tenant, session_id, project_id)
    await svc.audit.record(request, tenant, "project_set", session_id=session_id, project_id=project_id)
    return {}


@router.get("/sessions/{session_id}/trace_export",
            summary="A signed URL of the session's request timeline (Chrome/Perfetto trace JSON)")
async def trace_export(svc: Svc, tenant: Tenant, session_id: str, request: Request) -> dict[str, Any]:
    await svc.sessions.get_owned(tenant, session_id)
    return {"status": "ready", "url": await svc.downloads.trace_url(tenant, session_id, str(request.base_url))}
