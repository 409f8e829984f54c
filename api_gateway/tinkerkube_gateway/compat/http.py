"""HTTP edges shared by the compatible APIs: the API key (Bearer or x-api-key), the backend, error bodies in
each API's own shape, and server-sent events.

Errors: the gateway's typed errors keep their status (errors.py decides it, as everywhere); only the body
changes, to what the official clients parse (`{"error": {...}}` for OpenAI, `{"type": "error", ...}` for
Anthropic), through a route class so that errors raised in dependencies (auth) are shaped too.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute

from tinkerkube_contract.paths import InvalidTinkerPath
from tinkerkube_gateway.compat.backend import CompatBackend
from tinkerkube_gateway.compat.samplers import CompatSamplers
from tinkerkube_gateway.deps import Services, caller_of_key
from tinkerkube_gateway.errors import GatewayError

ErrorShape = Callable[[int, str], dict[str, Any]]  # (status, message) → body


def api_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return (value.strip() or None) if scheme.lower() == "bearer" else None


async def compat_tenant(request: Request) -> str:
    missing = "missing API key: send 'Authorization: Bearer tml-...' or 'x-api-key: tml-...'"
    return (await caller_of_key(request, api_key(request), missing)).tenant


async def compat_backend(request: Request) -> CompatBackend:
    """One backend per started app (its sampler/session cache), made on first use."""
    services: Services = request.app.state.services
    held: tuple[Services, CompatBackend] | None = getattr(request.app.state, "compat_backend", None)
    if held is None or held[0] is not services:
        samplers = CompatSamplers(services.sessions, services.sampling, services.capabilities)
        held = (services, CompatBackend(samplers, services.sampling, services.futures, services.cancels))
        request.app.state.compat_backend = held
    return held[1]


CompatTenant = Annotated[str, Depends(compat_tenant)]
Backend = Annotated[CompatBackend, Depends(compat_backend)]


def _shaped(shape: ErrorShape, status: int, message: str, retryable: bool,
            headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(shape(status, message), status_code=status,
                        headers={"x-should-retry": "true" if retryable else "false", **(headers or {})})


def shaped_errors(shape: ErrorShape) -> type[APIRoute]:
    """A route class answering the gateway's errors with `shape`'s body (status and retry hint unchanged)."""

    class ShapedErrorRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def shaped(request: Request) -> Response:
                try:
                    return await handler(request)
                except GatewayError as exc:
                    return _shaped(shape, exc.status, exc.detail, exc.retryable, exc.headers)
                except InvalidTinkerPath as exc:
                    return _shaped(shape, 400, str(exc), False)

            return shaped

    return ShapedErrorRoute


def _json(data: object) -> str:
    return json.dumps(data, separators=(",", ":"), allow_nan=False)


def sse_data(data: object) -> str:
    return f"data: {_json(data)}\n\n"


def sse_event(name: str, data: object) -> str:
    return f"event: {name}\ndata: {_json(data)}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return _ClosingStream(events, media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _ClosingStream(StreamingResponse):
    """Closes its event iterator however the response ends: a client that went away mid-stream is noticed
    on a send, and the iterator's cleanup (cancelling the sample) must run then, not whenever it is
    garbage-collected."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()
