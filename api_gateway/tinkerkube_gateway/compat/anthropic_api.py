"""The Anthropic-compatible Messages API: `/anthropic/api/v1/messages` (+ `/messages/count_tokens`).

Point the official client at it with `anthropic.Anthropic(base_url=<gateway>/anthropic/api, api_key=<tml-key>)`
(the client adds `/v1/messages`). A final assistant turn is a prefill: the chat template continues it. The
stream sends text deltas as the sampler decodes, in Anthropic's event sequence (see openai_api); the id
`msg_req-...` names the sample's Tinker future.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from tinkerkube_gateway.compat.backend import CompatBackend, Target, started
from tinkerkube_gateway.compat.http import Backend, CompatTenant, shaped_errors, sse_event, sse_response
from tinkerkube_gateway.compat.increments import Delta
from tinkerkube_gateway.compat.schemas import AnthropicMessage, CountTokensRequest, MessagesRequest
from tinkerkube_gateway.compat.shaping import Choice
from tinkerkube_gateway.compat.values import SampleSpec
from tinkerkube_gateway.deps import Body
from tinkerkube_gateway.errors import GatewayError
from tinkerkube_gateway.wire import parse_json

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


router = APIRouter(prefix="/anthropic/api/v1", tags=["anthropic-compatible"],
                   route_class=shaped_errors(anthropic_error))


async def _render(backend: CompatBackend, target: Target, system: str | None,
                  messages: list[AnthropicMessage]) -> tuple[list[int], int | None]:
    turns = ([("system", system)] if system else []) + [(m.role, m.text()) for m in messages]
    return await backend.render_chat(target, turns, continue_final=messages[-1].role == "assistant")


def _stop_reason(c: Choice) -> str:
    if c.stop_sequence is not None:
        return "stop_sequence"
    return "end_turn" if c.finish_reason == "stop" else "max_tokens"


@router.post("/messages", summary="Create a message (Anthropic shape; streams text as it is sampled)")
async def messages(tenant: CompatTenant, backend: Backend, body: Body) -> Response:
    req = parse_json(body, MessagesRequest)
    target = await backend.target(tenant, req.model)
    prompt, context = await _render(backend, target, req.system_text(), req.messages)
    spec = SampleSpec(max_tokens=req.max_tokens, temperature=req.temperature,
                      top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or -1,
                      stop=tuple(s for s in req.stop_sequences or () if s))
    sub = await backend.submit(target, prompt, spec, context)
    head = {"id": f"msg_{sub.request_id}", "type": "message", "role": "assistant", "model": req.model}
    if req.stream:
        deltas = await started([backend.deltas(sub, spec.stop, pieces=True)])
        return sse_response(_events(head, len(prompt), deltas))
    choices, _, _ = await backend.choices(target, await backend.result(sub), spec.stop, pieces=False)
    c = choices[0]
    return JSONResponse({**head, "content": [{"type": "text", "text": c.text}], "stop_reason": _stop_reason(c),
                         "stop_sequence": c.stop_sequence,
                         "usage": {"input_tokens": len(prompt), "output_tokens": c.completion_tokens}})


async def _events(head: dict[str, Any], input_tokens: int, deltas: AsyncIterator[list[Delta]]) -> AsyncIterator[str]:
    start = {**head, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": input_tokens, "output_tokens": 0}}
    yield sse_event("message_start", {"type": "message_start", "message": start})
    yield sse_event("content_block_start", {"type": "content_block_start", "index": 0,
                                            "content_block": {"type": "text", "text": ""}})
    yield sse_event("ping", {"type": "ping"})
    final: Choice | None = None
    try:
        async for batch in deltas:
            for d in batch:
                for piece in d.pieces:
                    if piece.text:
                        yield sse_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                                "delta": {"type": "text_delta", "text": piece.text}})
                final = d.final or final
    except GatewayError as exc:  # after the first event the status is sent: the error goes in the stream
        yield sse_event("error", anthropic_error(exc.status, exc.detail))
        return
    assert final is not None  # a stream ends with its choice's final delta
    yield sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
    stop = {"stop_reason": _stop_reason(final), "stop_sequence": final.stop_sequence}
    yield sse_event("message_delta", {"type": "message_delta", "delta": stop,
                                      "usage": {"output_tokens": final.completion_tokens}})
    yield sse_event("message_stop", {"type": "message_stop"})


@router.post("/messages/count_tokens", summary="Count a request's input tokens (Anthropic shape)")
async def count_tokens(tenant: CompatTenant, backend: Backend, body: Body) -> dict[str, int]:
    req = parse_json(body, CountTokensRequest)
    target = await backend.target(tenant, req.model)
    prompt, _ = await _render(backend, target, req.system_text(), req.messages)
    return {"input_tokens": len(prompt)}
