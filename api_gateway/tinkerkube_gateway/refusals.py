"""No gaps: a refused request still uses the seq_id it names.

The SDK numbers a training client's requests 1, 2, 3, ... and the gateway runs them strictly in that
order, so a seq_id that never becomes a future would hold every later op of the run. Whatever refuses
a request (validation, a route that does not exist, a body too large or undecodable), errors.py calls
`consume_seq` before answering the 4xx: the (model_id, seq_id) the body names, read best-effort even from
a broken or truncated body (`wire.recover_address`), is recorded as a failed future with the refusal's
message. Only the tenant's own runs are touched, and only from routes that carry a training seq_id.
"""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request

from tinkerkube_gateway import wire
from tinkerkube_gateway.deps import Services
from tinkerkube_gateway.store.records import FutureOp

PREFIX = "/api/v1/"
ROUTE_OPS = {
    "forward_backward": FutureOp.FORWARD_BACKWARD,
    "optim_step": FutureOp.OPTIM_STEP,
    "save_weights": FutureOp.SAVE_STATE,
    "save_weights_for_sampler": FutureOp.SAVE_SAMPLER_WEIGHTS,
    "save_weights_external": FutureOp.SAVE_WEIGHTS_EXTERNAL,
    "load_weights": FutureOp.LOAD_STATE,
}


def refused_op(request: Request) -> FutureOp | None:
    """The op a refused request was, None for requests that carry no training seq_id (create_model,
    asample, REST...). A route this gateway does not have may be one a newer SDK uses for an op."""
    path = request.url.path
    if request.method != "POST" or not path.startswith(PREFIX):
        return None
    op = ROUTE_OPS.get(path.removeprefix(PREFIX))
    if op is None and "route" not in request.scope:
        return FutureOp.UNKNOWN
    return op


async def consume_seq(request: Request, problem: str) -> None:
    op = refused_op(request)
    services: Services | None = getattr(request.app.state, "services", None)
    if op is None or services is None:
        return
    tenant = await services.keys.tenant_or_none(request.headers.get("x-api-key"))
    if tenant is None:
        return
    body = getattr(request.state, "body", None)
    address = wire.recover_address(await _head(request) if body is None else body,
                                   request.headers.get("content-encoding"))
    if address is not None:
        await services.ops.refuse(tenant, address.model_id, address.seq_id, op, problem)


async def _head(request: Request) -> bytes:
    """The start of a body nobody read (a route that does not exist): enough to name the op."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size >= wire.ADDRESS_PREFIX_BYTES:
                break
    except (ClientDisconnect, RuntimeError):  # gone, or already consumed
        pass
    return b"".join(chunks)
