"""aiohttp client for the internal trainer API (tinkerkube_contract.pod_api).

Submits are PUTs of (model_id, seq_id) or a sample's request id; results are long-polled GETs. The
trainer's 4xx `ErrorBody` becomes `OpRejected` (the user's fault, a failed future); connection trouble
becomes `TrainerUnreachable` (the dispatcher then asks the backend whether the trainer is gone).
aiohttp rather than httpx: two calls per op, and httpx's per-request CPU was a third of the gateway's.
Like httpx: no DNS cache (a restarted trainer may have a new address), proxies from the environment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import aiohttp

from tinkerkube_contract import pod_api
from tinkerkube_contract.pod_api import ErrorCategory, OpState, TrainerInfo
from tinkerkube_gateway.backends.base import TrainerHandle


class TrainerUnreachable(Exception):
    pass


class OpRejected(Exception):
    def __init__(self, status: int, detail: str, category: ErrorCategory):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.category = category


@dataclass(frozen=True, slots=True)
class OpResult:
    state: OpState
    content_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    content_type: str
    state: str | None
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class PodClient:
    def __init__(self, *, timeout: float = 60.0, long_poll: float = pod_api.MAX_WAIT_SECONDS):
        self._long_poll = long_poll
        self._wait = {"wait": str(long_poll)}
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout, sock_connect=5.0, sock_read=timeout)
        self._poll_timeout = aiohttp.ClientTimeout(total=None, connect=timeout, sock_connect=5.0,
                                                   sock_read=long_poll + 15)
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:  # created on the running loop, at first use
            connector = aiohttp.TCPConnector(limit=500, use_dns_cache=False)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout, trust_env=True)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self, handle: TrainerHandle, **extra: str) -> dict[str, str]:
        headers = dict(extra)
        if handle.token:
            headers[pod_api.HEADER_TOKEN] = handle.token
        return headers

    async def _send(self, method: str, url: str, **kwargs: object) -> _Reply:
        try:
            async with self._http().request(method, url, **kwargs) as response:  # type: ignore[arg-type]
                body = await response.read()
                return _Reply(response.status, response.headers.get("Content-Type", pod_api.CONTENT_JSON),
                              response.headers.get(pod_api.HEADER_OP_STATE), body)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TrainerUnreachable(f"{method} {url}: {type(exc).__name__}: {exc}") from exc

    async def _request(self, method: str, url: str, **kwargs: object) -> _Reply:
        response = await self._send(method, url, **kwargs)
        if response.status >= 500:
            raise TrainerUnreachable(f"{method} {url}: HTTP {response.status}: {response.text[:300]}")
        if response.status >= 400:
            raise _rejected(response)
        return response

    async def submit_op(self, handle: TrainerHandle, model_id: str, seq_id: int, kind: str, body: bytes,
                        content_type: str) -> None:
        headers = self._headers(handle, **{pod_api.HEADER_OP: kind, "Content-Type": content_type})
        await self._request("PUT", handle.url + pod_api.op_path(model_id, seq_id), data=body, headers=headers)

    async def poll_op(self, handle: TrainerHandle, model_id: str, seq_id: int) -> OpResult:
        url = handle.url + pod_api.op_path(model_id, seq_id)
        return await self._poll(handle, url)

    async def submit_sample(self, handle: TrainerHandle, request_id: str, op: pod_api.SampleOp) -> None:
        headers = self._headers(handle, **{pod_api.HEADER_OP: pod_api.OpKind.SAMPLE,
                                           "Content-Type": pod_api.CONTENT_JSON})
        await self._request("PUT", handle.url + pod_api.sample_path(request_id),
                            data=op.model_dump_json().encode(), headers=headers)

    async def poll_sample(self, handle: TrainerHandle, request_id: str) -> OpResult:
        return await self._poll(handle, handle.url + pod_api.sample_path(request_id))

    async def _poll(self, handle: TrainerHandle, url: str) -> OpResult:
        response = await self._request("GET", url, params=self._wait, headers=self._headers(handle),
                                       timeout=self._poll_timeout)
        state = OpState(response.state or _state_from_status(response.status))
        return OpResult(state, response.content_type, response.body)

    async def info(self, handle: TrainerHandle) -> TrainerInfo:
        response = await self._request("GET", handle.url + pod_api.INFO_PATH, headers=self._headers(handle))
        return TrainerInfo.model_validate_json(response.body)

    async def ready(self, url: str, token: str | None) -> bool:
        try:
            response = await self._send("GET", url + pod_api.READY_PATH, timeout=aiohttp.ClientTimeout(total=2.0),
                                        headers=self._headers(TrainerHandle(url, token)))
        except TrainerUnreachable:
            return False
        return response.status == 200


def _state_from_status(status: int) -> str:
    return OpState.PENDING.value if status == 202 else OpState.COMPLETE.value


def _rejected(response: _Reply) -> OpRejected:
    try:
        data = json.loads(response.body)
        detail = str(data.get("detail") or data.get("error") or response.text)
        category = ErrorCategory(data.get("category", ErrorCategory.USER))
    except (ValueError, json.JSONDecodeError, AttributeError):
        detail, category = response.text or f"HTTP {response.status}", ErrorCategory.USER
    if response.status in (401, 403):
        category = ErrorCategory.SERVER
    return OpRejected(response.status, detail, category)
