"""The Anthropic-compatible Messages API: `/anthropic/api/v1/messages` (+ `/messages/count_tokens`).

Point the official client at it with `anthropic.Anthropic(base_url=<gateway>/anthropic/api, api_key=<tml-key>)`
(the client adds `/v1/messages`). A final assistant turn is a prefill: the chat template continues it. The
stream replays the whole sample in Anthropic's event sequence once it is sampled (see openai_api).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from tinkerkube_gateway.compat.backend import CompatBackend, Target
from tinkerkube_gateway.compat.http import Backend, CompatTenant, shaped_errors, sse_event, sse_response
from tinkerkube_gateway.compat.schemas import AnthropicMessage, CountTokensRequest, MessagesRequest
from tinkerkube_gateway.compat.shaping import Choice
from tinkerkube_gateway.compat.values import SampleSpec
from tinkerkube_gateway.deps import Body
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


@router.post("/messages", summary="Create a message (Anthropic shape; stream replays a whole sample)")
async def messages(tenant: CompatTenant, backend: Backend, body: Body) -> Response:
    req = parse_json(body, MessagesRequest)
    target = await backend.target(tenant, req.model)
    prompt, context = await _render(backend, target, req.system_text(), req.messages)
    spec = SampleSpec(max_tokens=req.max_tokens, temperature=req.temperature,
                      top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or -1,
                      stop=tuple(s for s in req.stop_sequences or () if s))
    generation = await backend.generate(target, prompt, spec, context)
    choices, _, _ = await backend.choices(target, generation, spec.stop, pieces=req.stream)
    c = choices[0]
    message = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": req.model,
               "content": [{"type": "text", "text": c.text}], "stop_reason": _stop_reason(c),
               "stop_sequence": c.stop_sequence,
               "usage": {"input_tokens": len(prompt), "output_tokens": c.completion_tokens}}
    if req.stream:
        return sse_response(_events(message, c))
    return JSONResponse(message)


def _events(message: dict[str, Any], c: Choice) -> Iterator[str]:
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": message["usage"]["input_tokens"], "output_tokens": 0}}
    yield sse_event("message_start", {"type": "message_start", "message": start})
    yield sse_event("content_block_start", {"type": "content_block_start", "index": 0,
                                            "content_block": {"type": "text", "text": ""}})
    yield sse_event("ping", {"type": "ping"})
    for text in c.chunks:
        if text:
            yield sse_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "text_delta", "text": text}})
    yield sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield sse_event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": message["stop_reason"],
                                                "stop_sequence": message["stop_sequence"]},
                                      "usage": {"output_tokens": message["usage"]["output_tokens"]}})
    yield sse_event("message_stop", {"type": "message_stop"})


@router.post("/messages/count_tokens", summary="Count a request's input tokens (Anthropic shape)")
async def count_tokens(tenant: CompatTenant, backend: Backend, body: Body) -> dict[str, int]:
    req = parse_json(body, CountTokensRequest)
    target = await backend.target(tenant, req.model)
    prompt, _ = await _render(backend, target, req.system_text(), req.messages)
    return {"input_tokens": len(prompt)}
