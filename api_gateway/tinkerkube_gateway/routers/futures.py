"""Futures: retrieve_future (long-poll, then try_again with the queue state), retrieve_futures (one
long-poll per sampling session), cancel_future."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from tinkerkube_gateway.deps import Body, Svc, Tenant
from tinkerkube_gateway.routers.common import parse
from tinkerkube_gateway.schemas import RequestIdRequest, RetrieveFutureRequest, RetrieveFuturesRequest
from tinkerkube_gateway.store.records import FutureState

router = APIRouter(prefix="/api/v1", tags=["futures"])


@router.post("/retrieve_future", summary="Wait for a future's result (long-poll, then try_again)")
async def retrieve_future(svc: Svc, tenant: Tenant, body: Body) -> Response:
    req = parse(body, RetrieveFutureRequest)
    fut = await svc.futures.wait(tenant, req.request_id)
    if fut.state == FutureState.PENDING:
        status = svc.futures.queue_status(fut)
        answer: dict[str, Any] = {"type": "try_again", "request_id": fut.request_id, "queue_state": status.state.value}
        if status.reason is not None:
            answer["queue_state_reason"] = status.reason
        return JSONResponse(answer)
    if fut.state == FutureState.FAILED:
        return JSONResponse({"error": fut.error or "failed", "category": fut.category or "unknown"})
    return Response(content=fut.result or b"{}", media_type=fut.result_type or "application/json")


@router.post("/retrieve_futures", summary="Samples of a sampling session finished since a cursor (long-poll)")
async def retrieve_futures(svc: Svc, tenant: Tenant, body: Body) -> dict[str, Any]:
    req = parse(body, RetrieveFuturesRequest)
    page = await svc.completions.poll(tenant, req.target.sampling_session_id, req.target.cloned_sampler_id,
                                      req.prev_cursor, req.timeout)
    return page.model_dump(mode="json")


@router.post("/cancel_future", summary="Cancel a pending future (what that means: services/cancel.py)")
async def cancel_future(svc: Svc, tenant: Tenant, body: Body) -> dict[str, Any]:
    outcome = await svc.cancels.cancel(tenant, parse(body, RequestIdRequest).request_id)
    return outcome.model_dump(mode="json")
