"""The caller's credentials and account: JWT exchange, the calling key (`tinker auth`), and the admin
client's audit log and usage (docs/auth-and-audit.md).

Admin access: the organisation is the tenant, and every key of a tenant is its admin: it sees its own
tenant's audit log and usage, never another's.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from fastapi import APIRouter, Query

from tinkerkube_gateway.deps import CallerDep, Svc, Tenant
from tinkerkube_gateway.services.audit import EventType

router = APIRouter(prefix="/api/v1", tags=["account"])


@router.post("/auth/token", summary="Exchange the calling credential for a short-lived JWT")
async def auth_token(svc: Svc, caller: CallerDep) -> dict[str, Any]:
    return {"jwt": await svc.keys.mint(caller)}


@router.get("/auth/apikey/me", summary="The calling API key's id and public metadata")
async def describe_key(svc: Svc, caller: CallerDep) -> dict[str, Any]:
    return svc.keys.describe(caller)


@router.delete("/auth/apikey/me", summary="Revoke the calling API key, on every replica")
async def revoke_key(svc: Svc, caller: CallerDep) -> dict[str, Any]:
    await svc.keys.revoke(caller)
    return {}


@router.get("/audit", summary="The tenant's audit log for one UTC day")
async def audit(svc: Svc, tenant: Tenant, event_type: EventType = Query("all"),
                day: date | None = Query(None)) -> dict[str, Any]:
    return await svc.audit.day(tenant, event_type, day)


@router.get("/billing/usage/events", summary="The tenant's hourly usage (tokens, checkpoints, storage)")
async def usage_events(svc: Svc, tenant: Tenant, starting_on: datetime = Query(...),
                       ending_before: datetime = Query(...)) -> dict[str, Any]:
    return await svc.usage.events(tenant, starting_on, ending_before)


@router.get("/billing/usage/checkpoints/current", summary="The tenant's checkpoint storage now, by project")
async def current_storage(svc: Svc, tenant: Tenant,
                          project_id: str | None = Query(None, min_length=1, max_length=200)) -> dict[str, Any]:
    return await svc.usage.current_storage(tenant, project_id)
