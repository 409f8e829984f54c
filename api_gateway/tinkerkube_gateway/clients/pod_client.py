"""Client of the internal trainer API (tinkerkube_contract.pod_api), on the lean HTTP/1.1 pool of `http11`.

Submits are PUTs of (model_id, seq_id) or a sample's request id; results are long-polled GETs. The
trainer's 4xx `ErrorBody` becomes `OpRejected` (the user's fault, a failed future); connection trouble
becomes `TrainerUnreachable` (the dispatcher then asks the backend whether the trainer is gone).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol, TypeVar

from pydantic import BaseModel

from tinkerkube_contract import pod_api
from tinkerkube_contract.pod_api import ErrorCategory, OpState, RunInfo, RunSpec
from tinkerkube_gateway.backends.base import TrainerHandle
from tinkerkube_gateway.clients.http11 import TRANSPORT_ERRORS, Http11Pool, HttpResponse

M = TypeVar("M", bound=BaseModel)


class TrainerUnreachable(Exception):
    pass


class OpRejected(Exception):
    """The trainer refused a request (4xx `ErrorBody`); `code` is its `ErrorBody.code` (see `ErrorCode`)."""

    def __init__(self, status: int, detail: str, category: ErrorCategory, code: str = ""):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.category = category
        self.code = code


@dataclass(frozen=True, slots=True)
class OpResult:
    state: OpState
    content_type: str
    body: bytes


class PodObserver(Protocol):
    """Told when an op or sample went to a trainer and when its finished answer came back (the session
    trace export). Keys: `op_key(model_id, trainer_seq)` for ops, the request id for samples."""

    def forwarded(self, key: str) -> None: ...
    def answered(self, key: str, timing: pod_api.OpTiming | None) -> None: ...


def op_key(model_id: str, trainer_seq: int) -> str:
    return f"{model_id}#{trainer_seq}"


class PodClient:
    def __init__(self, *, timeout: float = 60.0, long_poll: float = pod_api.MAX_WAIT_SECONDS,
                 observer: PodObserver | None = None):
        self._long_poll = long_poll
        self._timeout = timeout
        self._http = Http11Pool(connect_timeout=5.0)
        self.observer = observer

    async def close(self) -> None:
        await self._http.aclose()

    def _headers(self, handle: TrainerHandle, **extra: str) -> dict[str, str]:
        headers = dict(extra)
        if handle.token:
            headers[pod_api.HEADER_TOKEN] = handle.token
        return headers

    async def _request(self, method: str, url: str, *, timeout: float | None = None,
                       **kwargs: object) -> HttpResponse:
        try:
            response = await self._http.request(method, url, timeout=timeout or self._timeout,
                                                **kwargs)  # type: ignore[arg-type]
        except TRANSPORT_ERRORS as exc:
            raise TrainerUnreachable(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 500:
            raise TrainerUnreachable(f"{method} {url}: HTTP {response.status_code}: {response.text[:300]}")
        if response.status_code >= 400:
            raise _rejected(response)
        return response

    async def submit_op(self, handle: TrainerHandle, model_id: str, seq_id: int, kind: str, body: bytes,
                        content_type: str) -> None:
        headers = self._headers(handle, **{pod_api.HEADER_OP: kind, "Content-Type": content_type})
        await self._request("PUT", handle.url + pod_api.op_path(model_id, seq_id), content=body, headers=headers)
        if self.observer is not None:
            self.observer.forwarded(op_key(model_id, seq_id))

    async def poll_op(self, handle: TrainerHandle, model_id: str, seq_id: int) -> OpResult:
        url = handle.url + pod_api.op_path(model_id, seq_id)
        return await self._poll(handle, url, op_key(model_id, seq_id))

    async def submit_sample(self, handle: TrainerHandle, request_id: str, op: pod_api.SampleOp) -> None:
        headers = self._headers(handle, **{pod_api.HEADER_OP: pod_api.OpKind.SAMPLE,
                                           "Content-Type": pod_api.CONTENT_JSON})
        await self._request("PUT", handle.url + pod_api.sample_path(request_id), content=op.model_dump_json().encode(),
                            headers=headers)
        if self.observer is not None:
            self.observer.forwarded(request_id)

    async def poll_sample(self, handle: TrainerHandle, request_id: str) -> OpResult:
        return await self._poll(handle, handle.url + pod_api.sample_path(request_id), request_id)

    async def sample_progress(self, handle: TrainerHandle, request_id: str, after: int) -> pod_api.SampleProgress:
        """Long-polls a running sample's tokens past `after` (see pod_api); 404 (OpRejected): not there yet."""
        response = await self._request("GET", handle.url + pod_api.sample_progress_path(request_id),
                                       params={"after": after, "wait": self._long_poll}, headers=self._headers(handle),
                                       timeout=self._long_poll + 15)
        return pod_api.SampleProgress.model_validate_json(response.content)

    async def cancel_sample(self, handle: TrainerHandle, request_id: str) -> None:
        """Stops a sample on its trainer (a running one leaves its decode at the next step)."""
        await self._request("DELETE", handle.url + pod_api.sample_path(request_id), headers=self._headers(handle))

    async def _poll(self, handle: TrainerHandle, url: str, key: str) -> OpResult:
        response = await self._request("GET", url, params={"wait": self._long_poll}, headers=self._headers(handle),
                                       timeout=self._long_poll + 15)
        state = OpState(response.headers.get(pod_api.HEADER_OP_STATE, _state_from_status(response.status_code)))
        if state is not OpState.PENDING and self.observer is not None:
            self.observer.answered(key, pod_api.OpTiming.parse(response.headers.get(pod_api.HEADER_OP_TIMING)))
        return OpResult(state, response.headers.get("content-type", pod_api.CONTENT_JSON), response.content)

    async def post_json(self, handle: TrainerHandle, path: str, body: BaseModel, reply: type[M]) -> M:
        """A small JSON call (the text routes): 4xx → OpRejected, trouble → TrainerUnreachable."""
        headers = self._headers(handle, **{"Content-Type": pod_api.CONTENT_JSON})
        response = await self._request("POST", handle.url + path, content=body.model_dump_json().encode(),
                                       headers=headers)
        return reply.model_validate_json(response.content)

    async def info(self, handle: TrainerHandle, model_id: str, *, wait: float = 0.0) -> RunInfo:
        """The run's state on its trainer pool; a new `boot_id` means its in-memory state was rebuilt.
        `wait`: hold while the run is still attaching (long-poll)."""
        response = await self._request("GET", handle.url + pod_api.run_path(model_id), params={"wait": wait},
                                       headers=self._headers(handle), timeout=wait + self._timeout)
        return RunInfo.model_validate_json(response.content)

    async def attach(self, handle: TrainerHandle, spec: RunSpec) -> RunInfo:
        """Attach a run to the pool at `handle` (idempotent). A full pool is an OpRejected with status 429."""
        headers = self._headers(handle, **{"Content-Type": pod_api.CONTENT_JSON})
        try:
            response = await self._http.request("PUT", handle.url + pod_api.run_path(spec.model_id),
                                                content=spec.model_dump_json().encode(), headers=headers,
                                                timeout=self._timeout)
        except TRANSPORT_ERRORS as exc:
            raise TrainerUnreachable(f"attach {spec.model_id}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            raise _rejected(response)
        return RunInfo.model_validate_json(response.content)

    async def detach(self, handle: TrainerHandle, model_id: str) -> None:
        await self._request("DELETE", handle.url + pod_api.run_path(model_id), headers=self._headers(handle))

    async def ready(self, url: str, token: str | None) -> bool:
        try:
            response = await self._http.request("GET", url + pod_api.READY_PATH, timeout=2.0,
                                                headers=self._headers(TrainerHandle(url, token)))
        except TRANSPORT_ERRORS:
            return False
        return response.status_code == 200


def _state_from_status(status: int) -> str:
    return OpState.PENDING.value if status == 202 else OpState.COMPLETE.value


def _rejected(response: HttpResponse) -> OpRejected:
    code = ""
    try:
        data = json.loads(response.content)
        detail = str(data.get("detail") or data.get("error") or response.text)
        category = ErrorCategory(data.get("category", ErrorCategory.USER))
        code = str(data.get("code") or "")
    except (ValueError, json.JSONDecodeError, AttributeError):
        detail, category = response.text or f"HTTP {response.status_code}", ErrorCategory.USER
    if response.status_code in (401, 403):
        category = ErrorCategory.SERVER
    return OpRejected(response.status_code, detail, category, code)
