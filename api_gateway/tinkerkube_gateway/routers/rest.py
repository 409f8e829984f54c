"""REST: training runs, checkpoints (list/delete/ttl/publish), weights_info, sessions (§3.5)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from tinkerkube_gateway.bounds import MAX_INT32
from tinkerkube_gateway.deps import Body, Svc, Tenant
from tinkerkube_gateway.routers.common import parse
from tinkerkube_gateway.schemas import TtlRequest, WeightsInfoRequest

router = APIRouter(prefix="/api/v1", tags=["rest"])
Limit = Query(100, ge=1, le=1000)
Offset = Query(0, ge=0, le=MAX_INT32)


@router.get("/training_runs", summary="List the tenant's training runs")
async def list_runs(svc: Svc, tenant: Tenant, limit: int = Limit, offset: int = Offset) -> dict[str, Any]:
    return await svc.registry.list_runs(tenant, limit, offset)


@router.get("/training_runs/{run_id}", summary="One training run (user_metadata, last checkpoints)")
async def get_run(svc: Svc, tenant: Tenant, run_id: str) -> dict[str, Any]:
    return await svc.registry.run_json(await svc.registry.get_run(tenant, run_id))


@router.get("/training_runs/{run_id}/checkpoints", summary="A run's checkpoints")
async def run_checkpoints(svc: Svc, tenant: Tenant, run_id: str, limit: int = Limit,
                          offset: int = Offset) -> dict[str, Any]:
    return await svc.registry.list_checkpoints(tenant, run_id, limit, offset)


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish", summary="Unpublish")
async def unpublish(svc: Svc, tenant: Tenant, run_id: str, checkpoint_id: str) -> dict[str, Any]:
    await svc.registry.set_public(tenant, run_id, checkpoint_id, False)
    return {}


@router.post("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish", summary="Publish (public read)")
async def publish(svc: Svc, tenant: Tenant, run_id: str, checkpoint_id: str) -> dict[str, Any]:
    await svc.registry.set_public(tenant, run_id, checkpoint_id, True)
    return {}


@router.put("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl", summary="Set or clear a TTL")
async def set_ttl(svc: Svc, tenant: Tenant, run_id: str, checkpoint_id: str, body: Body) -> dict[str, Any]:
    await svc.registry.set_ttl(tenant, run_id, checkpoint_id, parse(body, TtlRequest).ttl_seconds)
    return {}


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}", summary="Delete a checkpoint")
async def delete_checkpoint(svc: Svc, tenant: Tenant, run_id: str, checkpoint_id: str) -> dict[str, Any]:
    await svc.registry.delete(tenant, run_id, checkpoint_id)
    return {}


@router.get("/checkpoints", summary="All of the tenant's checkpoints")
async def list_checkpoints(svc: Svc, tenant: Tenant, limit: int = Limit, offset: int = Offset) -> dict[str, Any]:
    return await svc.registry.list_checkpoints(tenant, None, limit, offset)


@router.post("/weights_info", summary="Base model and LoRA config of a checkpoint")
async def weights_info(svc: Svc, tenant: Tenant, body: Body) -> dict[str, Any]:
    return await svc.registry.weights_info(tenant, parse(body, WeightsInfoRequest).tinker_path)


@router.get("/sessions", summary="The tenant's sessions")
async def list_sessions(svc: Svc, tenant: Tenant, limit: int = Limit, offset: int = Offset) -> dict[str, Any]:
    return {"sessions": await svc.sessions.list_ids(tenant, limit, offset)}


@router.get("/sessions/{session_id}", summary="A session's runs and samplers")
async def get_session(svc: Svc, tenant: Tenant, session_id: str) -> dict[str, Any]:
    return await svc.sessions.describe(tenant, session_id)
