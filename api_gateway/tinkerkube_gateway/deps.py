"""FastAPI dependencies: the tenant from X-API-Key, the services from app.state, raw bodies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from tinkerkube_gateway.errors import PayloadTooLarge, Unauthenticated
from tinkerkube_gateway.metrics import Metrics
from tinkerkube_gateway.services.futures import FuturesService
from tinkerkube_gateway.services.models import ModelsService
from tinkerkube_gateway.services.ops import OpsService
from tinkerkube_gateway.services.registry import RegistryService
from tinkerkube_gateway.services.sampling import SamplingService
from tinkerkube_gateway.services.sessions import SessionsService


@dataclass
class Services:
    sessions: SessionsService
    futures: FuturesService
    models: ModelsService
    ops: OpsService
    sampling: SamplingService
    registry: RegistryService
    metrics: Metrics
    tenant_keys: dict[str, str]
    max_body_bytes: int
    capabilities: list[str]
    client_config: dict[str, object]


# The dependencies are `async def` although they never await: FastAPI runs a plain `def` dependency in
# its thread pool, a thread hop per dependency per request.
def _services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


async def services(request: Request) -> Services:
    return _services(request)


async def tenant(request: Request) -> str:
    key = request.headers.get("x-api-key")
    if not key:
        raise Unauthenticated("missing X-API-Key header (set TINKER_API_KEY=tml-...)")
    found = _services(request).tenant_keys.get(key)
    if found is None:
        raise Unauthenticated("unknown API key")
    return found


async def raw_body(request: Request) -> bytes:
    limit = _services(request).max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


Svc = Annotated[Services, Depends(services)]
Tenant = Annotated[str, Depends(tenant)]
Body = Annotated[bytes, Depends(raw_body)]
