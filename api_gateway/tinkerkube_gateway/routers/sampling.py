"""Sampling sessions and asample (tinker-protocol.md §3.4)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from tinkerkube_gateway import wire
from tinkerkube_gateway.deps import Body, Svc, Tenant
from tinkerkube_gateway.routers.common import parse, submitted
from tinkerkube_gateway.schemas import CreateSamplingSessionRequest, JoinSamplingSessionRequest, SampleRequest

router = APIRouter(prefix="/api/v1", tags=["sampling"])


@router.post("/create_sampling_session", summary="A sampler for a base model or a tinker:// sampler path")
async def create_sampling_session(svc: Svc, tenant: Tenant, body: Body, request: Request) -> dict[str, Any]:
    req = parse(body, CreateSamplingSessionRequest)
    sampler_id, created = await svc.sampling.create_session(tenant, req)
    if created:  # a retried create is not a second change
        await svc.audit.record(request, tenant, "sampler_create", sampler_id=sampler_id, model_path=req.model_path,
                               base_model=req.base_model)
    return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}


@router.post("/join_sampling_session", summary="A clone id for another client (an unpickled SamplingClient)")
async def join_sampling_session(svc: Svc, tenant: Tenant, body: Body) -> dict[str, Any]:
    clone = await svc.sampling.join(tenant, parse(body, JoinSamplingSessionRequest).sampling_session_id)
    return {"client_counter": clone, "type": "join_sampling_session"}


@router.get("/samplers/{sampler_id}", summary="What a sampler serves")
async def get_sampler(svc: Svc, tenant: Tenant, sampler_id: str) -> dict[str, Any]:
    return await svc.sampling.describe(tenant, sampler_id)


@router.post("/asample", summary="Sample completions (future → protobuf SampleResponse)")
async def asample(svc: Svc, tenant: Tenant, body: Body) -> dict[str, Any]:
    raw = wire.load_json(body)
    request = wire.validate(raw, SampleRequest)
    wire.check_prompt(raw.get("prompt"), pointers=svc.sampling.assets is not None)
    fut, sequence_ids = await svc.sampling.sample(tenant, request, raw)
    return submitted(fut, sample_sequence_ids=sequence_ids)
