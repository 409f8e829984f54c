"""create_app: routers, error handlers, request metrics, /metrics, and the services' lifespan."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tinkerkube_gateway.compat import anthropic_api, openai_api
from tinkerkube_gateway.deps import Services
from tinkerkube_gateway.errors import install_error_handlers
from tinkerkube_gateway.refusals import consume_seq
from tinkerkube_gateway.routers import account, downloads, futures, rest, sampling, service, sessions, training

ServicesFactory = Callable[[], AbstractAsyncContextManager[Services]]


class RequestMetrics:
    """Counts and times every HTTP request by matched route and status (pure ASGI: no re-streaming)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, send_status)
        services: Services | None = getattr(scope["app"].state, "services", None)
        if services is not None and status:
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            services.metrics.requests_total.labels(endpoint=endpoint, status=str(status)).inc()
            services.metrics.request_seconds.labels(endpoint=endpoint).observe(time.perf_counter() - start)


def create_app(make_services: ServicesFactory) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with make_services() as services:
            app.state.services = services
            yield

    app = FastAPI(title="tinkerkube gateway", version="0.1.0", lifespan=lifespan,
                  description="The Tinker training API for the unmodified tinker SDK and tinker-cookbook.")
    install_error_handlers(app, on_refused=consume_seq)
    for module in (service, account, training, sampling, futures, rest, sessions, downloads, openai_api,
                   anthropic_api):
        app.include_router(module.router)

    app.add_middleware(RequestMetrics)

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        services: Services = request.app.state.services
        return Response(services.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
