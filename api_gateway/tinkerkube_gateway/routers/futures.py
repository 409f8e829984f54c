"""retrieve_future: long-poll (up to ~30 s), then try_again; protobuf or JSON results; failures."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from tinkerkube_gateway.deps import Body, Svc, Tenant
from tinkerkube_gateway.routers.common import parse
from tinkerkube_gateway.schemas import RetrieveFutureRequest
from tinkerkube_gateway.store.records import FutureState

router = APIRouter(prefix="/api/v1", tags=["futures"])


@router.post("/retrieve_future", summary="Wait for a future's result (long-poll, then try_again)")
async def retrieve_future(svc: Svc, tenant: Tenant, body: Body) -> Response:
    req = parse(body, RetrieveFutureRequest)
    fut = await svc.futures.wait(tenant, req.request_id)
    if fut.state == FutureState.PENDING:
        return JSONResponse({"type": "try_again", "request_id": fut.request_id, "queue_state": "active"})
    if fut.state == FutureState.FAILED:
        return JSONResponse({"error": fut.error or "failed", "category": fut.category or "unknown"})
    return Response(content=fut.result or b"{}", media_type=fut.result_type or "application/json")
