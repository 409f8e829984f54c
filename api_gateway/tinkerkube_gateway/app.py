"""create_app: routers, error handlers, request metrics, /metrics, and the services' lifespan."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI, Request, Response

from tinkerkube_gateway.deps import Services
from tinkerkube_gateway.errors import install_error_handlers
from tinkerkube_gateway.routers import futures, rest, sampling, service, training

ServicesFactory = Callable[[], AbstractAsyncContextManager[Services]]


def create_app(make_services: ServicesFactory) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with make_services() as services:
            app.state.services = services
            yield

    app = FastAPI(title="tinkerkube gateway", version="0.1.0", lifespan=lifespan,
                  description="The Tinker training API for the unmodified tinker SDK and tinker-cookbook.")
    install_error_handlers(app)
    for module in (service, training, sampling, futures, rest):
        app.include_router(module.router)

    @app.middleware("http")
    async def _count(request: Request, call_next: Callable[[Request], object]) -> Response:
        start = time.perf_counter()
        response: Response = await call_next(request)  # type: ignore[misc]
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        services: Services | None = getattr(request.app.state, "services", None)
        if services is not None:
            services.metrics.requests_total.labels(endpoint=endpoint, status=str(response.status_code)).inc()
            services.metrics.request_seconds.labels(endpoint=endpoint).observe(time.perf_counter() - start)
        return response

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        services: Services = request.app.state.services
        return Response(services.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
