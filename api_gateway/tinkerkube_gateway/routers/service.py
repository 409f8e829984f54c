"""Client setup, sessions, telemetry, health and capabilities (tinker-protocol.md §3.1, §3.2)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from tinkerkube_gateway.deps import Body, Svc, Tenant
from tinkerkube_gateway.routers.common import parse, submitted
from tinkerkube_gateway.schemas import (
    CreateCustomLossRequest,
    CreateSessionRequest,
    FinishSessionRequest,
    SessionIdRequest,
)

router = APIRouter(prefix="/api/v1", tags=["service"])

# Flags of features this gateway does not serve stay off; `sample_use_retrieve_futures` and
# `pjwt_auth_enabled` come from settings.
CLIENT_CONFIG = {"pjwt_auth_enabled": False, "parallel_fwdbwd_chunks": True,
                 "sample_use_retrieve_futures": False, "custom_loss_server_side": True,
                 "sample_join_sampling_session": True}


@router.post("/client/config", summary="Client configuration (first call of every SDK client)")
async def client_config(svc: Svc, _: Tenant) -> dict[str, Any]:
    return {**CLIENT_CONFIG, **svc.client_config}


@router.post("/client/dynamic_config", summary="Dynamic client configuration (sample cancellation)")
async def dynamic_config(svc: Svc, _: Tenant) -> dict[str, Any]:
    return dict(svc.dynamic_config)


@router.post("/create_session", summary="Start a Tinker session")
async def create_session(svc: Svc, tenant: Tenant, body: Body, request: Request) -> dict[str, Any]:
    req = parse(body, CreateSessionRequest)
    session_id = await svc.sessions.create(tenant, req)
    await svc.audit.record(request, tenant, "session_create", session_id=session_id, project_id=req.project_id)
    return {"session_id": session_id, "type": "create_session"}


@router.post("/create_custom_loss", summary="Validate and store a traced custom loss (future → loss_id)")
async def create_custom_loss(svc: Svc, tenant: Tenant, body: Body) -> dict[str, Any]:
    return submitted(await svc.custom_losses.create(tenant, parse(body, CreateCustomLossRequest)))


@router.post("/session_heartbeat", summary="Keep a session alive (410 once it has ended)")
async def heartbeat(svc: Svc, tenant: Tenant, body: Body) -> dict[str, Any]:
    await svc.sessions.heartbeat(tenant, parse(body, SessionIdRequest).session_id)
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish", summary="End a session and every run it started")
async def finish(svc: Svc, tenant: Tenant, session_id: str, body: Body, request: Request) -> dict[str, Any]:
    req = parse(body, FinishSessionRequest)
    reason = str((req.reason or {}).get("type", "unspecified"))
    await svc.sessions.finish(tenant, session_id, reason)
    await svc.audit.record(request, tenant, "session_finish", session_id=session_id, reason=reason)
    return {}


@router.post("/telemetry", summary="Accept (and drop) client telemetry")
async def telemetry(_: Tenant) -> dict[str, Any]:
    return {"status": "accepted"}


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get("/get_server_capabilities", summary="The configured base models")
async def capabilities(svc: Svc, _: Tenant) -> dict[str, Any]:
    return {"supported_models": [{"model_name": m, "trainable": True, "sampleable": True}
                                 for m in svc.capabilities]}
