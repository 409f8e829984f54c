"""Typed gateway errors and the ONLY exception→HTTP map (`install_error_handlers`).

Status-code traps of the SDK (tinker-protocol.md §0.10, §1.7): never 402 or 409 (paused / retried),
never a 400 with an empty body (read as a proxy glitch), never a 5xx for a user's mistake (retried for
minutes). Every body is `{detail, category}`; `x-should-retry` tells the SDK whether to retry.

A refused request may still name an op (model_id + seq_id): the `on_refused` hook then records that
seq_id as failed, so later ops of the run do not wait for it. A 5xx consumes nothing: the SDK retries it
with the same seq_id.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinkerkube_contract.paths import InvalidTinkerPath
from tinkerkube_contract.pod_api import ErrorCategory

log = logging.getLogger(__name__)


class GatewayError(Exception):
    status: int = 500
    category: ErrorCategory = ErrorCategory.SERVER
    retryable: bool = True
    consumes_seq: bool = True  # a refusal of an op uses up its seq_id (see `on_refused`)

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail

    @property
    def headers(self) -> dict[str, str]:
        """Extra response headers (Retry-After on a 429)."""
        return {}


class InvalidRequest(GatewayError):
    status, category, retryable = 400, ErrorCategory.USER, False


class SeqIdReused(InvalidRequest):
    """The same (model_id, seq_id) submitted again with a different op: 400, not 409 (the SDK retries 409)."""

    consumes_seq = False  # it is already used


class SeqIdTooFarAhead(InvalidRequest):
    """Beyond the ahead limit: refused without using the seq_id, which stays free for its real op."""

    consumes_seq = False


class Unsupported(InvalidRequest):
    """A Tinker route this server does not implement (yet): a clear 400, never a retried 5xx."""


class Forbidden(GatewayError):
    """Credentials that do not grant this (an access token that is no key here, a download link whose
    signature does not match or that expired)."""

    status, category, retryable = 403, ErrorCategory.USER, False


class Backpressure(GatewayError):
    """A sampler or the tenant's share of it is saturated: 429 with Retry-After. The SDK sends the same
    asample again after a short pause (its seq_id stays free: nothing was recorded)."""

    status, category, retryable, consumes_seq = 429, ErrorCategory.SERVER, True, False

    def __init__(self, detail: str, retry_after: float):
        super().__init__(detail)
        self.retry_after = max(1, min(60, int(retry_after + 0.999)))

    @property
    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after), "retry-after-ms": str(self.retry_after * 1000)}


class PayloadTooLarge(GatewayError):
    status, category, retryable = 413, ErrorCategory.USER, False


class Unauthenticated(GatewayError):
    status, category, retryable = 401, ErrorCategory.USER, False


class NotFound(GatewayError):
    status, category, retryable = 404, ErrorCategory.USER, False


class UnknownSession(NotFound):
    pass


class UnknownModel(NotFound):
    pass


class UnknownFuture(NotFound):
    pass


class UnknownCheckpoint(NotFound):
    pass


class SessionGone(GatewayError):
    """Heartbeat on a finished/reaped session: 410 stops the SDK's heartbeat loop."""

    status, category, retryable = 410, ErrorCategory.USER, False


class TrainerUnavailable(GatewayError):
    status, category, retryable = 503, ErrorCategory.SERVER, True


def error_body(detail: str, category: ErrorCategory) -> dict[str, str]:
    return {"detail": detail, "category": category.value}


def _respond(status: int, detail: str, category: ErrorCategory, retryable: bool,
             headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(detail, category), status_code=status,
                        headers={"x-should-retry": "true" if retryable else "false", **(headers or {})})


RefusalHook = Callable[[Request, str], Awaitable[None]]  # (the refused request, why)


def install_error_handlers(app: FastAPI, on_refused: RefusalHook | None = None) -> None:
    async def refuse(request: Request, status: int, detail: str, consumes_seq: bool = True,
                     headers: dict[str, str] | None = None) -> JSONResponse:
        if on_refused is not None and consumes_seq and 400 <= status < 500:
            try:
                await on_refused(request, detail)
            except Exception:  # the answer is the refusal; failing to record it must not make it a 500
                log.exception("could not record the refused request %s %s", request.method, request.url.path)
        return _respond(status, detail, ErrorCategory.USER, False, headers)

    @app.exception_handler(GatewayError)
    async def _gateway(request: Request, exc: GatewayError) -> JSONResponse:
        if exc.category is ErrorCategory.USER:
            return await refuse(request, exc.status, exc.detail, exc.consumes_seq, exc.headers)
        return _respond(exc.status, exc.detail, exc.category, exc.retryable, exc.headers)

    @app.exception_handler(InvalidTinkerPath)
    async def _path(request: Request, exc: InvalidTinkerPath) -> JSONResponse:
        return await refuse(request, 400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:5]]
        return await refuse(request, 400, "invalid request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = 400 if exc.status_code in (402, 409) else exc.status_code
        if status >= 500:
            return _respond(status, str(exc.detail) or "error", ErrorCategory.SERVER, True)
        return await refuse(request, status, str(exc.detail) or "error")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _respond(500, f"internal error: {type(exc).__name__}", ErrorCategory.SERVER, True)
