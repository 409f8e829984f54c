"""Training runs and their ops: create_model, get_info, forward_backward, optim_step, saves, loads."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from tinkerkube_gateway import wire
from tinkerkube_gateway.deps import Body, Svc, Tenant
from tinkerkube_gateway.routers.common import parse, submitted
from tinkerkube_gateway.schemas import (
    CreateModelRequest,
    LoadWeightsRequest,
    ModelIdRequest,
    OptimStepRequest,
    SaveWeightsExternalRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
)

router = APIRouter(prefix="/api/v1", tags=["training"])
INLINE_CHECK_BYTES = 64 * 1024


@router.post("/create_model", summary="Create a LoRA training run (future → model_id)")
async def create_model(svc: Svc, tenant: Tenant, body: Body, request: Request) -> dict[str, Any]:
    req = parse(body, CreateModelRequest)
    fut, created = await svc.models.create_model(tenant, req)
    if created:  # a retried create (the SDK retries on a lost answer) is not a second change
        await svc.audit.record(request, tenant, "model_create", model_id=fut.target_id, session_id=fut.session_id,
                               base_model=req.base_model)
    return submitted(fut)


@router.post("/get_info", summary="Model information (base model, tokenizer)")
async def get_info(svc: Svc, tenant: Tenant, body: Body) -> dict[str, Any]:
    return await svc.models.get_info(tenant, parse(body, ModelIdRequest).model_id)


@router.post("/forward_backward", summary="Forward(+backward) on a batch (protobuf body; future → protobuf)")
async def forward_backward(svc: Svc, tenant: Tenant, body: Body, request: Request) -> dict[str, Any]:
    args = (body, request.headers.get("content-encoding"), svc.max_body_bytes)
    # Decoding a large batch must not stall the event loop; a small one costs less than the thread hop.
    if len(body) <= INLINE_CHECK_BYTES:
        checked = wire.check_forward_backward(*args)
    else:
        checked = await asyncio.to_thread(wire.check_forward_backward, *args)
    if wire.may_be_custom_loss(checked.plain):
        inline = len(checked.plain) <= INLINE_CHECK_BYTES
        checked = checked._replace(plain=await svc.custom_losses.attach(tenant, checked.model_id, checked.plain,
                                                                         inline=inline))
    return submitted(await svc.ops.forward_backward(tenant, checked))


@router.post("/optim_step", summary="AdamW step on the accumulated gradients (future)")
async def optim_step(svc: Svc, tenant: Tenant, body: Body) -> dict[str, Any]:
    return submitted(await svc.ops.optim_step(tenant, parse(body, OptimStepRequest)))


@router.post("/save_weights", summary="Save adapter + optimizer state (future → tinker path)")
async def save_weights(svc: Svc, tenant: Tenant, body: Body) -> dict[str, Any]:
    return submitted(await svc.ops.save_weights(tenant, parse(body, SaveWeightsRequest)))


@router.post("/save_weights_for_sampler", summary="Save sampler weights, named or as an ephemeral snapshot")
async def save_for_sampler(svc: Svc, tenant: Tenant, body: Body) -> dict[str, Any]:
    return submitted(await svc.ops.save_for_sampler(tenant, parse(body, SaveWeightsForSamplerRequest)))


@router.post("/load_weights", summary="Load a checkpoint: into a new run (resume) or an existing one")
async def load_weights(svc: Svc, tenant: Tenant, body: Body) -> dict[str, Any]:
    req = parse(body, LoadWeightsRequest)
    return submitted(await svc.ops.load_weights(tenant, req, svc.granting_tenant(req.weights_access_token)))


@router.post("/save_weights_external", summary="Export the adapter as downloadable files (future → tinker path)")
async def save_weights_external(svc: Svc, tenant: Tenant, body: Body) -> dict[str, Any]:
    return submitted(await svc.ops.save_external(tenant, parse(body, SaveWeightsExternalRequest)))
