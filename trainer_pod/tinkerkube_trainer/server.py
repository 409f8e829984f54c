"""Rank 0's HTTP face: the internal pod API of `tinkerkube_contract.pod_api`, over the op queue.

`TrainerRuntime` owns what the app serves: the boot (on the op thread), the engine once built, the
op queue and the metrics. `create_app(runtime)` only translates HTTP to runtime calls. No heavy work
on the event loop: `prepare` (which may decode a big protobuf) runs on a small prepare pool, and
`execute` on the single op thread, one op at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinkerkube_contract import pod_api as api
from tinkerkube_contract.pod_api import ErrorCategory, OpKind, OpState
from tinkerkube_contract.resource import LoraSpec, SessionMode
from tinkerkube_trainer.engine_api import Engine, OpError, OpOutput, PreparedOp
from tinkerkube_trainer.metrics import TrainerMetrics, count_tokens
from tinkerkube_trainer.op_queue import Entry, OpQueue, RunResult, SeqIdReused, SeqIdStale, fingerprint

log = logging.getLogger(__name__)


@dataclass
class Booted:
    """What the boot (run on the op thread) hands the runtime once every rank has joined."""

    engine: Engine
    run_training: Callable[[PreparedOp], OpOutput]  # rank 0: broadcast + execute in step
    run_sample: Callable[[PreparedOp], OpOutput]  # rank 0 alone
    world_size: int = 1
    info: dict[str, Any] = field(default_factory=dict)  # engine.info() at boot
    heartbeat: Callable[[], None] | None = None  # rank 0, while idle: checks every rank is still there


@dataclass
class RuntimeOptions:
    model_id: str
    base_model: str
    mode: SessionMode = SessionMode.TRAIN
    lora: LoraSpec = field(default_factory=LoraSpec)
    world_size: int = 1
    token: str | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    max_wait_seconds: float = api.MAX_WAIT_SECONDS
    result_ttl_seconds: float = api.RESULT_TTL_SECONDS
    max_retained_results: int = 100_000
    heartbeat_seconds: float = 5.0


class TrainerRuntime:
    def __init__(self, options: RuntimeOptions, boot: Callable[[], Booted], *,
                 on_boot_failure: Callable[[BaseException], None] | None = None,
                 on_stop: Callable[[], None] | None = None, metrics: TrainerMetrics | None = None) -> None:
        self.options = options
        self.boot_id = str(uuid.uuid4())
        self.metrics = metrics or TrainerMetrics()
        self.metrics.world_size.set(options.world_size)
        self._boot = boot
        self._on_boot_failure = on_boot_failure
        self._on_stop = on_stop
        self.op_executor = ThreadPoolExecutor(1, thread_name_prefix="tinkerkube-op")
        self.prepare_pool = ThreadPoolExecutor(2, thread_name_prefix="tinkerkube-prepare")
        self.booted: Booted | None = None
        self.queue: OpQueue | None = None
        self.boot_error: str | None = None
        self._boot_task: asyncio.Task[None] | None = None

    @classmethod
    def for_engine(cls, engine: Engine, options: RuntimeOptions, **kwargs: Any) -> TrainerRuntime:
        """One rank, engine already built (tests, benchmarks)."""
        return cls(options, lambda: Booted(engine, engine.execute, engine.execute, 1, dict(engine.info())), **kwargs)

    @property
    def ready(self) -> bool:
        return self.queue is not None

    async def start(self) -> None:
        if self._boot_task is None:
            self._boot_task = asyncio.get_running_loop().create_task(self._run_boot(), name="trainer-boot")

    async def wait_ready(self, timeout: float = 60.0) -> None:
        await self.start()
        assert self._boot_task is not None
        await asyncio.wait_for(asyncio.shield(self._boot_task), timeout)
        if not self.ready:
            raise RuntimeError(f"trainer failed to boot: {self.boot_error}")

    async def _run_boot(self) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            booted = await loop.run_in_executor(self.op_executor, self._boot)
        except asyncio.CancelledError:  # stopped while booting: not a failure
            raise
        except BaseException as exc:
            self.boot_error = repr(exc)
            log.exception("boot failed")
            if self._on_boot_failure is not None:
                self._on_boot_failure(exc)
            return
        self.booted = booted
        last = booted.info.get("last_completed_seq_id") or 0
        self.queue = OpQueue(
            run_training=self._runner(booted.run_training), run_sample=self._runner(booted.run_sample),
            executor=self.op_executor, next_seq=int(last) + 1, ttl=self.options.result_ttl_seconds,
            max_retained=self.options.max_retained_results, on_finish=self._finished,
            idle_task=booted.heartbeat, idle_interval=self.options.heartbeat_seconds)
        self.queue.start()
        self.metrics.ready.set(1)
        self.metrics.queue_depth.set_function(lambda: float(self.queue.depth if self.queue else 0))
        log.info("ready", extra={"boot_seconds": round(time.monotonic() - started, 3), "next_seq": last + 1,
                                 "world_size": booted.world_size, "boot_id": self.boot_id})

    @staticmethod
    def _runner(run: Callable[[PreparedOp], OpOutput]) -> Callable[[PreparedOp], RunResult]:
        def wrapped(op: PreparedOp) -> RunResult:
            output = run(op)
            return RunResult(output, {"tokens": count_tokens(op.kind, output.content_type, output.body)})
        return wrapped

    def _finished(self, entry: Entry) -> None:
        wait = (entry.started_at - entry.submitted_at) if entry.started_at is not None else None
        run = (entry.finished_at - entry.started_at) if entry.started_at and entry.finished_at else None
        self.metrics.observe_finished(str(entry.kind), str(entry.state), wait_s=wait, run_s=run,
                                      tokens=int(entry.extra.get("tokens", 0)))
        log.info("op finished", extra={"op": str(entry.kind), "key": entry.key, "state": str(entry.state),
                                       "run_s": round(run or 0.0, 4), "wait_s": round(wait or 0.0, 4)})

    async def stop(self) -> None:
        """Finish the running op, run nothing more, release the other ranks."""
        if self.queue is not None:
            await self.queue.stop()
        if self._boot_task is not None and not self._boot_task.done():
            self._boot_task.cancel()
        if self._on_stop is not None and self.booted is not None:
            await asyncio.get_running_loop().run_in_executor(self.op_executor, self._on_stop)
        self.op_executor.shutdown(wait=False, cancel_futures=True)
        self.prepare_pool.shutdown(wait=False, cancel_futures=True)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[TrainerRuntime]:
        await self.wait_ready()
        try:
            yield self
        finally:
            await self.stop()

    def info(self) -> api.TrainerInfo:
        o = self.options
        extra = dict(self.booted.info) if self.booted else {}
        if self.queue is not None:
            extra["last_completed_seq_id"] = self.queue.last_finished_seq
        fields = {k: extra.get(k) for k in ("tokenizer_dir", "vocab_size", "last_completed_seq_id", "restored_from")}
        return api.TrainerInfo(  # a restored checkpoint's base model / LoRA win, when the engine reports them
            model_id=o.model_id, base_model=extra.get("base_model") or o.base_model, mode=o.mode,
            lora=extra.get("lora") or o.lora, world_size=self.booted.world_size if self.booted else o.world_size,
            ready=self.ready, boot_id=self.boot_id, **fields)


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, category: ErrorCategory = ErrorCategory.USER):
        super().__init__(detail)
        self.status, self.code, self.detail, self.category = status, code, detail, category


def _error_response(status: int, code: str, detail: str, category: ErrorCategory = ErrorCategory.USER,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    body = api.ErrorBody(detail=detail, code=code, category=category).model_dump(mode="json")
    return JSONResponse(body, status_code=status, headers=headers)


def _op_error_status(exc: OpError) -> int:
    if exc.code.endswith("not_found"):  # e.g. checkpoint_not_found, snapshot_not_found
        return 404
    return 400 if exc.category is ErrorCategory.USER else 500


def _state_response(queue: OpQueue, entry: Entry) -> Response:
    headers = {api.HEADER_OP_STATE: str(entry.state)}
    if entry.state is OpState.COMPLETE:
        assert entry.output is not None
        return Response(entry.output.body, status_code=200, media_type=entry.output.content_type, headers=headers)
    if entry.state is OpState.FAILED:
        assert entry.failure is not None
        return JSONResponse(entry.failure.model_dump(mode="json"), status_code=200, headers=headers)
    pending = api.OpPending(queue_position=queue.position(entry))
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
    _install_auth(app, runtime)
    _add_probe_routes(app, runtime)
    _add_op_routes(app, runtime)
    _add_sample_routes(app, runtime)
    return app


def _install_error_handlers(app: FastAPI, runtime: TrainerRuntime) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        runtime.metrics.rejected_total.labels(code=exc.code).inc()
        headers = {"x-should-retry": "true"} if exc.status == 503 else None
        return _error_response(exc.status, exc.code, exc.detail, exc.category, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(400, "invalid_request", f"invalid request: {exc.errors()}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(exc.status_code, code, str(exc.detail))


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
        return JSONResponse(runtime.info().model_dump(mode="json"))

    @app.get(api.METRICS_PATH)
    async def metrics() -> Response:
        return Response(runtime.metrics.render(), media_type=runtime.metrics.content_type)


def _queue(runtime: TrainerRuntime) -> OpQueue:
    if runtime.queue is None:
        raise ApiError(503, "not_ready", "the trainer is still starting; retry shortly", ErrorCategory.SERVER)
    return runtime.queue


def _check_model(runtime: TrainerRuntime, model_id: str) -> None:
    if model_id != runtime.options.model_id:
        raise ApiError(404, "unknown_model", f"this trainer serves {runtime.options.model_id!r}, not {model_id!r}")


async def _prepare(runtime: TrainerRuntime, kind: OpKind, body: bytes, content_type: str,
                   seq_id: int | None = None) -> PreparedOp:
    """On the prepare pool: decoding a large body must not stall the event loop."""
    assert runtime.booted is not None
    call = partial(runtime.booted.engine.prepare, seq_id=seq_id)
    try:
        return await asyncio.get_running_loop().run_in_executor(runtime.prepare_pool, call, kind, body, content_type)
    except OpError as exc:
        raise ApiError(_op_error_status(exc), exc.code, exc.message, exc.category) from exc
    except Exception as exc:  # prepare touches no state: whatever broke it, the input did
        log.warning("prepare raised", exc_info=True, extra={"op": str(kind)})
        raise ApiError(400, "invalid_request", f"could not decode the {kind} request: {exc}") from exc


async def _submit(runtime: TrainerRuntime, request: Request, kind: OpKind, key: int | str) -> Response:
    """Read, dedupe, prepare (off the loop), enqueue. Nothing is enqueued when any step refuses."""
    queue = _queue(runtime)
    body = await _read_body(request, runtime.options.max_body_bytes)
    fp = fingerprint(kind, body)
    is_sample = kind is OpKind.SAMPLE
    try:
        existing = queue.check_sample(str(key), fp) if is_sample else queue.check_op(int(key), fp)
        if existing is not None:
            return _state_response(queue, existing)
        prepared = await _prepare(runtime, kind, body, request.headers.get("content-type", ""),
                                  None if is_sample else int(key))
        entry = queue.submit_sample(str(key), fp, prepared) if is_sample else queue.submit_op(int(key), kind, fp,
                                                                                               prepared)
    except (SeqIdReused, SeqIdStale) as exc:
        code = "seq_id_reused" if isinstance(exc, SeqIdReused) else "seq_id_stale"
        raise ApiError(400, code, str(exc)) from exc
    return _state_response(queue, entry)


async def _poll(runtime: TrainerRuntime, entry: Entry | None, what: str, wait: float) -> Response:
    queue = _queue(runtime)
    if entry is None:
        raise ApiError(404, f"unknown_{what}", f"no such {what} (never submitted, or expired)")
    await queue.wait(entry, min(wait, runtime.options.max_wait_seconds))
    return _state_response(queue, entry)


def _add_op_routes(app: FastAPI, runtime: TrainerRuntime) -> None:
    path = "/v1/models/{model_id:path}/ops/{seq_id}"

    @app.put(path)
    async def put_op(model_id: str, seq_id: int, request: Request) -> Response:
        _check_model(runtime, model_id)
        if seq_id < 0:
            raise ApiError(400, "invalid_request", "seq_id must be >= 0")
        raw_kind = request.headers.get(api.HEADER_OP, "")
        try:
            kind = OpKind(raw_kind)
        except ValueError:
            raise ApiError(400, "invalid_request", f"{api.HEADER_OP} must name an op kind, got {raw_kind!r}") from None
        if kind is OpKind.SAMPLE:
            raise ApiError(400, "invalid_request", "samples go to the sample path, not the op path")
        return await _submit(runtime, request, kind, seq_id)

    @app.get(path)
    async def get_op(model_id: str, seq_id: int, wait: float = Query(0.0, ge=0)) -> Response:
        _check_model(runtime, model_id)
        return await _poll(runtime, _queue(runtime).get_op(seq_id), "op", wait)


def _add_sample_routes(app: FastAPI, runtime: TrainerRuntime) -> None:
    path = "/v1/samples/{request_id:path}"

    @app.put(path)
    async def put_sample(request_id: str, request: Request) -> Response:
        raw_kind = request.headers.get(api.HEADER_OP, OpKind.SAMPLE.value)
        if raw_kind != OpKind.SAMPLE.value:
            raise ApiError(400, "invalid_request", f"the sample path takes {api.HEADER_OP}: sample, not {raw_kind!r}")
        if not request_id:
            raise ApiError(400, "invalid_request", "empty request_id")
        return await _submit(runtime, request, OpKind.SAMPLE, request_id)

    @app.get(path)
    async def get_sample(request_id: str, wait: float = Query(0.0, ge=0)) -> Response:
        return await _poll(runtime, _queue(runtime).get_sample(request_id), "sample", wait)
