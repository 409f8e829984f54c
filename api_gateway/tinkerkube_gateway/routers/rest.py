"""REST: training runs, checkpoints (list/delete/ttl/publish, external weights URLs, copies), weights_info (§3.5)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from tinkerkube_gateway.deps import Body, Svc, Tenant
from tinkerkube_gateway.routers.common import Limit, Offset, parse
from tinkerkube_gateway.schemas import CopyWeightsRequest, TtlRequest, WeightsInfoRequest

router = APIRouter(prefix="/api/v1", tags=["rest"])


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
async def unpublish(svc: Svc, tenant: Tenant, run_id: str, checkpoint_id: str, request: Request) -> dict[str, Any]:
    await svc.registry.set_public(tenant, run_id, checkpoint_id, False)
    await svc.audit.record(request, tenant, "checkpoint_unpublish", model_id=run_id, checkpoint_id=checkpoint_id,
                           tinker_path=f"tinker://{run_id}/{checkpoint_id}")
    return {}


@router.post("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish", summary="Publish (public read)")
async def publish(svc: Svc, tenant: Tenant, run_id: str, checkpoint_id: str, request: Request) -> dict[str, Any]:
    await svc.registry.set_public(tenant, run_id, checkpoint_id, True)
    await svc.audit.record(request, tenant, "checkpoint_publish", model_id=run_id, checkpoint_id=checkpoint_id,
                           tinker_path=f"tinker://{run_id}/{checkpoint_id}")
    return {}


@router.put("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl", summary="Set or clear a TTL")
async def set_ttl(svc: Svc, tenant: Tenant, run_id: str, checkpoint_id: str, body: Body,
                  request: Request) -> dict[str, Any]:
    ttl = parse(body, TtlRequest).ttl_seconds
    await svc.registry.set_ttl(tenant, run_id, checkpoint_id, ttl)
    await svc.audit.record(request, tenant, "checkpoint_ttl_set", model_id=run_id, checkpoint_id=checkpoint_id,
                           tinker_path=f"tinker://{run_id}/{checkpoint_id}", ttl_seconds=ttl)
    return {}


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}", summary="Delete a checkpoint")
async def delete_checkpoint(svc: Svc, tenant: Tenant, run_id: str, checkpoint_id: str,
                            request: Request) -> dict[str, Any]:
    await svc.registry.delete(tenant, run_id, checkpoint_id)
    await svc.audit.record(request, tenant, "checkpoint_delete", model_id=run_id, checkpoint_id=checkpoint_id,
                           tinker_path=f"tinker://{run_id}/{checkpoint_id}")
    return {}


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/external_weights_urls",
            summary="Signed, expiring download URLs of an external weights checkpoint's files")
async def external_weights_urls(svc: Svc, tenant: Tenant, run_id: str, checkpoint_id: str,
                                request: Request) -> dict[str, Any]:
    signed = await svc.downloads.external_weights_urls(tenant, run_id, checkpoint_id, str(request.base_url))
    return {"urls": signed.urls, "expires": signed.expires.isoformat()}


@router.post("/copy_weights", summary="Copy a checkpoint into a new run that holds it (shares its files)")
async def copy_weights(svc: Svc, tenant: Tenant, body: Body, request: Request) -> dict[str, Any]:
    req = parse(body, CopyWeightsRequest)
    token = request.headers.get("x-tinker-weights-access-token") or req.weights_access_token
    path = await svc.copies.copy(tenant, req, granted_by=svc.granting_tenant(token),
                                 idempotency_key=request.headers.get("x-idempotency-key"))
    await svc.audit.record(request, tenant, "checkpoint_copy", source_path=req.source_path, tinker_path=path)
    return {"tinker_path": path}


@router.get("/checkpoints", summary="All of the tenant's checkpoints")
async def list_checkpoints(svc: Svc, tenant: Tenant, limit: int = Limit, offset: int = Offset) -> dict[str, Any]:
    return await svc.registry.list_checkpoints(tenant, None, limit, offset)


@router.post("/weights_info", summary="Base model and LoRA config of a checkpoint")
async def weights_info(svc: Svc, tenant: Tenant, body: Body) -> dict[str, Any]:
    return await svc.registry.weights_info(tenant, parse(body, WeightsInfoRequest).tinker_path)
