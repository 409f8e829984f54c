"""FastAPI dependencies: the tenant from X-API-Key, the services from app.state, raw bodies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from tinkerkube_gateway.errors import Forbidden, PayloadTooLarge
from tinkerkube_gateway.metrics import Metrics
from tinkerkube_gateway.services.audit import AuditLog
from tinkerkube_gateway.services.cancel import CancelService
from tinkerkube_gateway.services.completions import CompletionsService
from tinkerkube_gateway.services.copies import CopyService
from tinkerkube_gateway.services.custom_losses import CustomLossService
from tinkerkube_gateway.services.downloads import DownloadsService
from tinkerkube_gateway.services.futures import FuturesService
from tinkerkube_gateway.services.keys import Caller, KeyRing
from tinkerkube_gateway.services.models import ModelsService
from tinkerkube_gateway.services.ops import OpsService
from tinkerkube_gateway.services.registry import RegistryService
from tinkerkube_gateway.services.sampling import SamplingService
from tinkerkube_gateway.services.session_search import SessionSearch
from tinkerkube_gateway.services.sessions import SessionsService
from tinkerkube_gateway.services.traces import TraceService
from tinkerkube_gateway.services.usage import UsageService
from tinkerkube_gateway.wire import ADDRESS_PREFIX_BYTES


@dataclass
class Services:
    sessions: SessionsService
    futures: FuturesService
    models: ModelsService
    ops: OpsService
    sampling: SamplingService
    registry: RegistryService
    metrics: Metrics
    keys: KeyRing
    max_body_bytes: int
    capabilities: list[str]
    client_config: dict[str, object]
    completions: CompletionsService
    cancels: CancelService
    downloads: DownloadsService
    copies: CopyService
    session_search: SessionSearch
    traces: TraceService
    dynamic_config: dict[str, object]
    custom_losses: CustomLossService
    audit: AuditLog
    usage: UsageService

    def granting_tenant(self, access_token: str | None) -> str | None:
        """The tenant whose checkpoints a weights access token opens: the token is one of its API keys."""
        if access_token is None:
            return None
        tenant = self.keys.api_key_tenant(access_token)
        if tenant is None:
            raise Forbidden("the weights access token is not an API key of this gateway")
        return tenant


# The dependencies are `async def` although they never await: FastAPI runs a plain `def` dependency in
# its thread pool, a thread hop per dependency per request.
def _services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


async def services(request: Request) -> Services:
    return _services(request)


async def caller_of_key(request: Request, key: str | None, missing: str) -> Caller:
    """Who holds `key` (an API key, or a JWT minted for one); 401 otherwise. Kept on `request.state.caller`
    for the audit log."""
    caller = await _services(request).keys.identify(key, missing)
    request.state.caller = caller
    return caller


async def caller(request: Request) -> Caller:
    return await caller_of_key(request, request.headers.get("x-api-key"),
                               "missing X-API-Key header (set TINKER_API_KEY=tml-...)")


async def tenant(request: Request) -> str:
    return (await caller(request)).tenant


async def raw_body(request: Request) -> bytes:
    """The body, at most `max_body_bytes`. Kept on `request.state.body` (only its head when it is too
    large) so that a refusal can still read which op it was (`refusals`)."""
    return await read_body(request, _services(request).max_body_bytes)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    declared_too_large = bool(declared and declared.isdigit() and int(declared) > limit)
    keep = min(limit, ADDRESS_PREFIX_BYTES) if declared_too_large else limit
    chunks, size = [], 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > keep:
            break
    body = b"".join(chunks)
    if declared_too_large or size > limit:
        request.state.body = body[:ADDRESS_PREFIX_BYTES]
        raise PayloadTooLarge(f"request body of {declared or f'more than {limit}'} bytes exceeds the limit of "
                              f"{limit} bytes")
    request.state.body = body
    return body


Svc = Annotated[Services, Depends(services)]
Tenant = Annotated[str, Depends(tenant)]
CallerDep = Annotated[Caller, Depends(caller)]
Body = Annotated[bytes, Depends(raw_body)]
