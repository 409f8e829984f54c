"""The internal pod API over HTTP (`tinkerkube_contract.pod_api`): translation only.

Every route reads its request, asks the runtime, and answers with the contract's shapes; errors are
JSON `ErrorBody` with a status that says whose fault it is (4xx: the caller's, retryable 503: wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinkerkube_contract import pod_api as api
from tinkerkube_contract.pod_api import ErrorCategory, OpKind, OpState, RunSpec, RunState
from tinkerkube_trainer.engine_api import OpError, PreparedOp
from tinkerkube_trainer.run_queue import (
    Entry,
    RunConflict,
    RunQueue,
    RunUnavailable,
    SeqIdReused,
    SeqIdStale,
    fingerprint,
)
from tinkerkube_trainer.scheduler import Scheduler
from tinkerkube_trainer.server import TrainerRuntime
from tinkerkube_trainer.text_api import add_text_routes, text_model_of

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, category: ErrorCategory = ErrorCategory.USER):
        super().__init__(detail)
        self.status, self.code, self.detail, self.category = status, code, detail, category


def _error_response(status: int, code: str, detail: str, category: ErrorCategory = ErrorCategory.USER,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    body = api.ErrorBody(detail=detail, code=code, category=category).model_dump(mode="json")
    return JSONResponse(body, status_code=status, headers=headers)


def _op_error(exc: OpError) -> ApiError:
    # e.g. checkpoint_not_found, run_not_found → 404
    status = 404 if exc.code.endswith("not_found") else 400 if exc.category is ErrorCategory.USER else 500
    return ApiError(status, exc.code, exc.message, exc.category)


def _unavailable(exc: RunUnavailable) -> ApiError:
    if exc.retryable:
        return ApiError(503, "not_ready", str(exc), ErrorCategory.SERVER)
    return ApiError(404, "unknown_model", str(exc))


def _state_response(scheduler: Scheduler, entry: Entry, queue: RunQueue | None = None) -> Response:
    headers = {api.HEADER_OP_STATE: str(entry.state)}
    if entry.started_at is not None and entry.finished_at is not None:  # for the gateway's session traces
        headers[api.HEADER_OP_TIMING] = api.OpTiming(wait_s=max(0.0, entry.started_at - entry.submitted_at),
                                                     run_s=max(0.0, entry.finished_at - entry.started_at)).header()
    if entry.state is OpState.COMPLETE:
        assert entry.output is not None
        return Response(entry.output.body, status_code=200, media_type=entry.output.content_type, headers=headers)
    if entry.state is OpState.FAILED:
        assert entry.failure is not None
        return JSONResponse(entry.failure.model_dump(mode="json"), status_code=200, headers=headers)
    pending = api.OpPending(queue_position=scheduler.position(entry, queue))
    return JSONResponse(pending.model_dump(mode="json"), status_code=202, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(runtime: TrainerRuntime) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="tinkerkube trainer", version=api.API_VERSION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = runtime
    _install_error_handlers(app, runtime)
    app.add_middleware(_OpRoutes, runtime=runtime)  # added before the token check, so it runs inside it
    _install_auth(app, runtime)
    _add_probe_routes(app, runtime)
    _add_run_routes(app, runtime)
    _add_sample_routes(app, runtime)
    add_text_routes(app, lambda: text_model_of(runtime.booted.engine) if runtime.booted else None)
    return app


def _install_error_handlers(app: FastAPI, runtime: TrainerRuntime) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _refused(runtime, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(400, "invalid_request", f"invalid request: {exc.errors()}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(exc.status_code, code, str(exc.detail))


def _refused(runtime: TrainerRuntime, exc: ApiError) -> JSONResponse:
    runtime.metrics.rejected_total.labels(code=exc.code).inc()
    headers = {"x-should-retry": "true"} if exc.status in (429, 503) else None
    return _error_response(exc.status, exc.code, exc.detail, exc.category, headers)


_OPEN_PATHS = frozenset({api.HEALTH_PATH, api.READY_PATH, api.METRICS_PATH})


def _install_auth(app: FastAPI, runtime: TrainerRuntime) -> None:
    """A plain ASGI check (no BaseHTTPMiddleware: it would buffer long-polls and bodies)."""
    token = runtime.options.token
    if not token:
        return
    expected = token.encode()
    header = api.HEADER_TOKEN.lower().encode()

    class _TokenCheck:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"] not in _OPEN_PATHS:
                given = next((v for k, v in scope["headers"] if k == header), b"")
                if not hmac.compare_digest(given, expected):
                    runtime.metrics.rejected_total.labels(code="unauthorized").inc()
                    response = _error_response(401, "unauthorized", f"missing or wrong {api.HEADER_TOKEN}")
                    await response(scope, receive, send)
                    return
            await self.inner(scope, receive, send)

    app.add_middleware(_TokenCheck)


def _add_probe_routes(app: FastAPI, runtime: TrainerRuntime) -> None:
    @app.get(api.HEALTH_PATH)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "boot_id": runtime.boot_id}

    @app.get(api.READY_PATH)
    async def readyz() -> JSONResponse:
        if runtime.ready:
            return JSONResponse({"ready": True, "boot_id": runtime.boot_id})
        detail = f"boot failed: {runtime.boot_error}" if runtime.boot_error else "loading the model / joining ranks"
        return JSONResponse({"ready": False, "detail": detail, "boot_id": runtime.boot_id}, status_code=503)

    @app.get(api.INFO_PATH)
    async def info() -> JSONResponse:
        return JSONResponse(runtime.pool_info().model_dump(mode="json"))

    @app.get(api.METRICS_PATH)
    async def metrics() -> Response:
        return Response(runtime.metrics.render(), media_type=runtime.metrics.content_type)


def _scheduler(runtime: TrainerRuntime) -> Scheduler:
    if runtime.scheduler is None:
        raise ApiError(503, "not_ready", "the trainer is still starting; retry shortly", ErrorCategory.SERVER)
    return runtime.scheduler


def _queue(runtime: TrainerRuntime, model_id: str) -> RunQueue:
    try:
        return _scheduler(runtime).queue(model_id)
    except RunUnavailable as exc:
        raise _unavailable(exc) from exc


INLINE_PREPARE_BYTES = 64 * 1024  # smaller requests decode in well under a millisecond: no thread hop


async def _off_loop(runtime: TrainerRuntime, call: Any, *args: Any, size: int = INLINE_PREPARE_BYTES + 1) -> PreparedOp:
    """Decode + validate: a large body on the prepare pool (it must not stall the event loop), a small one
    right here (the thread hop would cost more than the decoding)."""
    try:
        if size <= INLINE_PREPARE_BYTES:
            return call(*args)  # type: ignore[no-any-return]
        return await asyncio.get_running_loop().run_in_executor(runtime.prepare_pool, call, *args)
    except OpError as exc:
        raise _op_error(exc) from exc
    except Exception as exc:  # prepare touches no state: whatever broke it, the input did
        log.warning("prepare raised", exc_info=True)
        raise ApiError(400, "invalid_request", f"could not decode the request: {exc}") from exc


def _add_run_routes(app: FastAPI, runtime: TrainerRuntime) -> None:
    path = api.RUNS_PATH + "/{model_id:path}"

    @app.put(path)
    async def attach(model_id: str, request: Request) -> JSONResponse:
        scheduler = _scheduler(runtime)
        body = await _read_body(request, runtime.options.max_body_bytes)
        try:
            spec = RunSpec.model_validate_json(body)
        except ValidationError as exc:
            raise ApiError(400, "invalid_request", f"invalid RunSpec: {exc.errors()[:3]}") from exc
        if spec.model_id != model_id:
            raise ApiError(400, "invalid_request", f"the path names {model_id!r}, the body {spec.model_id!r}")
        assert runtime.booted is not None
        prepared = await _off_loop(runtime, runtime.booted.engine.prepare_attach, spec)
        try:
            slot = scheduler.attach(spec, prepared)
        except RunConflict as exc:
            raise ApiError(409, "run_conflict", str(exc)) from exc
        except RunUnavailable as exc:
            raise ApiError(429, "pool_full", str(exc), ErrorCategory.SERVER) from exc
        return JSONResponse(runtime.run_info(slot).model_dump(mode="json"),
                            status_code=202 if slot.state is RunState.ATTACHING else 200)

    @app.get(path)
    async def get_run(model_id: str, wait: float = Query(0.0, ge=0)) -> JSONResponse:
        scheduler = _scheduler(runtime)
        slot = scheduler.slots.get(model_id)
        if slot is None or slot.detaching:
            raise ApiError(404, "unknown_model", f"no run {model_id!r} is attached to this pool")
        await scheduler.wait_slot(slot, min(wait, runtime.options.max_wait_seconds))
        return JSONResponse(runtime.run_info(slot).model_dump(mode="json"))

    @app.delete(path)
    async def detach(model_id: str) -> JSONResponse:
        scheduler = _scheduler(runtime)
        assert runtime.booted is not None
        scheduler.detach(model_id, runtime.booted.engine.prepare_detach(model_id))
        return JSONResponse({})


async def _submit(runtime: TrainerRuntime, request: Request, kind: OpKind, model_id: str | None,
                  key: int | str) -> Response:
    """Read, dedupe, prepare (off the loop), enqueue. Nothing is enqueued when any step refuses."""
    scheduler = _scheduler(runtime)
    queue = None if model_id is None else _queue(runtime, model_id)
    body = await _read_body(request, runtime.options.max_body_bytes)
    fp = fingerprint(kind, body)
    assert runtime.booted is not None
    try:
        existing = scheduler.check_sample(str(key), fp) if queue is None else queue.check(int(key), fp)
        if existing is not None:
            return _state_response(scheduler, existing, queue)
        seq_id = None if queue is None else int(key)
        prepare = partial(runtime.booted.engine.prepare, seq_id=seq_id)
        prepared = await _off_loop(runtime, prepare, model_id, kind, body, request.headers.get("content-type", ""),
                                   size=len(body))
        if queue is None:
            entry = scheduler.submit_sample(str(key), fp, prepared)
        else:
            entry = scheduler.submit_op(str(model_id), int(key), kind, fp, prepared)
    except (SeqIdReused, SeqIdStale) as exc:
        code = "seq_id_reused" if isinstance(exc, SeqIdReused) else "seq_id_stale"
        raise ApiError(400, code, str(exc)) from exc
    except RunUnavailable as exc:
        raise _unavailable(exc) from exc
    return _state_response(scheduler, entry, queue)


async def _poll(runtime: TrainerRuntime, entry: Entry | None, what: str, wait: float,
                queue: RunQueue | None = None) -> Response:
    scheduler = _scheduler(runtime)
    if entry is None:
        raise ApiError(404, f"unknown_{what}", f"no such {what} (never submitted, or expired)")
    await scheduler.wait(entry, min(wait, runtime.options.max_wait_seconds))
    return _state_response(scheduler, entry, queue)


_OPS_PREFIX, _OPS_INFIX = "/v1/models/", "/ops/"


class _OpRoutes:
    """`PUT` and `GET /v1/models/{model_id}/ops/{seq_id}` (every training op's submit and its result) served
    without the framework's routing, dependency and exception layers: a quarter of rank 0's CPU for a small op
    went to them, on the thread that also runs the model (it holds the GIL the op thread needs). Every other
    path and method goes on to FastAPI."""

    def __init__(self, app: Any, runtime: TrainerRuntime) -> None:
        self.app, self.runtime = app, runtime

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path: str = scope["path"] if scope["type"] == "http" else ""
        model_id, infix, seq = path[len(_OPS_PREFIX):].rpartition(_OPS_INFIX)
        if not (path.startswith(_OPS_PREFIX) and infix and model_id and scope["method"] in ("PUT", "GET")):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            seq_id = _int(seq, "seq_id")
            if scope["method"] == "PUT":
                response = await _put_op(self.runtime, request, model_id, seq_id)
            else:
                queue = _queue(self.runtime, model_id)
                wait = _wait(request.query_params.get("wait", "0"))
                response = await _poll(self.runtime, queue.get(seq_id), "op", wait, queue)
        except ApiError as exc:
            response = _refused(self.runtime, exc)
        await response(scope, receive, send)


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ApiError(400, "invalid_request", f"{name} must be an integer, got {text[:40]!r}") from None


def _wait(text: str) -> float:
    try:
        wait = float(text)
    except ValueError:
        wait = float("nan")
    if not wait >= 0:  # NaN too
        raise ApiError(400, "invalid_request", f"wait must be a number of seconds >= 0, got {text[:40]!r}")
    return wait


async def _put_op(runtime: TrainerRuntime, request: Request, model_id: str, seq_id: int) -> Response:
    if seq_id < 0:
        raise ApiError(400, "invalid_request", "seq_id must be >= 0")
    raw_kind = request.headers.get(api.HEADER_OP, "")
    try:
        kind = OpKind(raw_kind)
    except ValueError:
        raise ApiError(400, "invalid_request", f"{api.HEADER_OP} must name an op kind, got {raw_kind!r}") from None
    if kind is OpKind.SAMPLE:
        raise ApiError(400, "invalid_request", "samples go to the sample path, not the op path")
    return await _submit(runtime, request, kind, model_id, seq_id)


def _add_sample_routes(app: FastAPI, runtime: TrainerRuntime) -> None:
    path = "/v1/samples/{request_id:path}"

    @app.put(path)
    async def put_sample(request_id: str, request: Request) -> Response:
        raw_kind = request.headers.get(api.HEADER_OP, OpKind.SAMPLE.value)
        if raw_kind != OpKind.SAMPLE.value:
            raise ApiError(400, "invalid_request", f"the sample path takes {api.HEADER_OP}: sample, not {raw_kind!r}")
        if not request_id:
            raise ApiError(400, "invalid_request", "empty request_id")
        return await _submit(runtime, request, OpKind.SAMPLE, None, request_id)

    @app.get(path)
    async def get_sample(request_id: str, wait: float = Query(0.0, ge=0)) -> Response:
        return await _poll(runtime, _scheduler(runtime).get_sample(request_id), "sample", wait)

    @app.delete(path)
    async def cancel_sample(request_id: str) -> Response:
        scheduler = _scheduler(runtime)
        entry = scheduler.cancel_sample(request_id)
        if entry is None:
            raise ApiError(404, "unknown_sample", "no such sample (never submitted, or expired)")
        return _state_response(scheduler, entry)

    @app.get(api.SAMPLE_PROGRESS_PATH + "/{request_id:path}")
    async def sample_progress(request_id: str, after: int = Query(0, ge=0), wait: float = Query(0.0, ge=0)) -> Response:
        scheduler = _scheduler(runtime)
        entry = scheduler.get_sample(request_id)
        if entry is None:
            raise ApiError(404, "unknown_sample", "no such sample (never submitted, or expired)")
        progress = await scheduler.progress.read(entry, after, min(wait, runtime.options.max_wait_seconds))
        return Response(progress.model_dump_json(), media_type=api.CONTENT_JSON)
