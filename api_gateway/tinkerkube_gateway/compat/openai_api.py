"""The OpenAI-compatible API: `/oai/api/v1/chat/completions`, `/completions`, `/models`.

Point the official client at it with `openai.OpenAI(base_url=<gateway>/oai/api/v1, api_key=<tml-key>)`.
`model` is an offered base model or a `tinker://` path the tenant may sample (its own, or a published one).
Streaming is live: chunks (one per token) leave as the sampler decodes (see compat.increments for which
text may go out when), and the last chunk of a choice is cut from the same final sample as a request without
`stream`, so the joined text is the same. A response's id names the Tinker future of its sample
(`chatcmpl-req-...`): `retrieve_future` answers for it with the same API key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from tinkerkube_contract import paths
from tinkerkube_gateway.compat.backend import CompatBackend, Submitted, Target, started
from tinkerkube_gateway.compat.http import Backend, CompatTenant, shaped_errors, sse_data, sse_response
from tinkerkube_gateway.compat.increments import Delta
from tinkerkube_gateway.compat.schemas import ChatCompletionRequest, CompletionRequest, stops_of
from tinkerkube_gateway.compat.shaping import Choice, TokenInfo
from tinkerkube_gateway.compat.values import Generation, SampleSpec
from tinkerkube_gateway.deps import Body, Svc
from tinkerkube_gateway.errors import GatewayError, UnknownModel
from tinkerkube_gateway.wire import parse_json

_ERROR_TYPES = {401: ("invalid_request_error", "invalid_api_key"), 404: ("invalid_request_error", "model_not_found"),
                413: ("invalid_request_error", "request_too_large")}


def openai_error(status: int, message: str) -> dict[str, Any]:
    kind, code = _ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


router = APIRouter(prefix="/oai/api/v1", tags=["openai-compatible"], route_class=shaped_errors(openai_error))


def _model_card(name: str, created: int = 0) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "tinkerkube"}


@router.get("/models", summary="Base models and the tenant's sampler weights (OpenAI list shape)")
async def list_models(svc: Svc, tenant: CompatTenant) -> dict[str, Any]:
    cards = [_model_card(name) for name in svc.capabilities]
    checkpoints = await svc.registry.repo.list_checkpoints(tenant=tenant, limit=1000)
    cards += [_model_card(c.tinker_path, int(c.created_at)) for c in checkpoints
              if c.kind == paths.CheckpointKind.SAMPLER_WEIGHTS.value]
    return {"object": "list", "data": cards}


@router.get("/models/{model:path}", summary="One model (OpenAI shape)")
async def get_model(svc: Svc, tenant: CompatTenant, model: str) -> dict[str, Any]:
    if model in svc.capabilities:
        return _model_card(model)
    record = await svc.registry.resolve_readable(tenant, model) if model.startswith(paths.SCHEME) else None
    if record is None or record.kind != paths.CheckpointKind.SAMPLER_WEIGHTS.value:
        raise UnknownModel(f"the model {model!r} does not exist")
    return _model_card(record.tinker_path, int(record.created_at))


def _spec(req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None, top_logprobs: int,
          prompt_logprobs: bool = False) -> SampleSpec:
    return SampleSpec(n=req.n, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                      seed=req.seed, stop=stops_of(req.stop), top_logprobs=top_logprobs,
                      prompt_logprobs=prompt_logprobs)


def _usage(prompt_tokens: int, choices: list[Choice]) -> dict[str, int]:
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


# ------------------------------------------------------------------------------------------ chat


def _entry(token: TokenInfo) -> dict[str, Any]:
    return {"token": token.token, "logprob": token.logprob, "bytes": list(token.token.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in token.top]}


@router.post("/chat/completions", summary="Chat completions (OpenAI shape; streams tokens as they are sampled)")
async def chat_completions(tenant: CompatTenant, backend: Backend, body: Body) -> Response:
    req = parse_json(body, ChatCompletionRequest)
    target = await backend.target(tenant, req.model)
    prompt, context = await backend.render_chat(target, [(m.template_role, m.text()) for m in req.messages])
    spec = _spec(req, req.token_limit, req.top_logprobs or 0)
    sub = await backend.submit(target, prompt, spec, context)
    head = {"id": f"chatcmpl-{sub.request_id}", "created": int(time.time()), "model": req.model,
            "system_fingerprint": None}
    if req.stream:
        deltas = await started([backend.deltas(sub, spec.stop, pieces=True)])
        return sse_response(_chat_chunks(head, req, deltas, len(prompt)))
    generation = await backend.result(sub)
    choices, _, _ = await backend.choices(target, generation, spec.stop, pieces=req.logprobs)
    return JSONResponse({**head, "object": "chat.completion", "usage": _usage(len(prompt), choices), "choices": [
        {"index": i, "message": {"role": "assistant", "content": c.text},
         "logprobs": {"content": [_entry(t) for t in c.tokens], "refusal": None} if req.logprobs else None,
         "finish_reason": c.finish_reason} for i, c in enumerate(choices)]})


async def _chat_chunks(head: dict[str, Any], req: ChatCompletionRequest, deltas: AsyncIterator[list[Delta]],
                       prompt_tokens: int) -> AsyncIterator[str]:
    base = {**head, "object": "chat.completion.chunk", **({"usage": None} if req.include_usage else {})}

    def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> str:
        return sse_data({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                              "finish_reason": finish}]})

    begun: set[int] = set()
    finals: dict[int, Choice] = {}
    try:
        async for batch in deltas:
            for d in batch:
                if d.index not in begun:
                    begun.add(d.index)
                    yield chunk(d.index, {"role": "assistant", "content": ""})
                for piece in d.pieces:
                    entries = [_entry(piece.token)] if piece.token is not None else []
                    yield chunk(d.index, {"content": piece.text},
                                {"content": entries, "refusal": None} if req.logprobs else None)
                if d.final is not None:
                    finals[d.index] = d.final
                    yield chunk(d.index, {}, finish=d.final.finish_reason)
    except GatewayError as exc:  # after the first chunk the status is sent: the error goes in the stream
        yield sse_data(openai_error(exc.status, exc.detail))
        return
    if req.include_usage:
        yield sse_data({**base, "choices": [], "usage": _usage(prompt_tokens, [finals[i] for i in sorted(finals)])})
    yield "data: [DONE]\n\n"


# ------------------------------------------------------------------------------------------ completions


def _legacy(tokens: tuple[TokenInfo, ...], shift: int, with_top: bool) -> dict[str, list[Any]]:
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens] if with_top else None,
            "text_offset": [t.offset + shift for t in tokens]}


def _merge(a: dict[str, list[Any]], b: dict[str, list[Any]]) -> dict[str, Any]:
    return {k: None if a[k] is None else a[k] + b[k] for k in a}


async def _prompt_ids(backend: CompatBackend, target: Target,
                      prompts: list[str] | list[list[int]]) -> tuple[list[list[int]], int | None]:
    if isinstance(prompts[0], str):
        return await backend.encode(target, prompts)  # type: ignore[arg-type]
    return prompts, await backend.context_length(target)  # type: ignore[return-value]  # ids: the sampler checks


@router.post("/completions", summary="Text completions (OpenAI legacy shape; streams tokens as they are sampled)")
async def completions(tenant: CompatTenant, backend: Backend, body: Body) -> Response:
    req = parse_json(body, CompletionRequest)
    target = await backend.target(tenant, req.model)
    prompts, context = await _prompt_ids(backend, target, req.prompts())
    with_logprobs = req.logprobs is not None
    spec = _spec(req, req.max_tokens, req.logprobs or 0, prompt_logprobs=req.echo and with_logprobs)
    subs: list[Submitted] = await asyncio.gather(*(backend.submit(target, p, spec, context) for p in prompts))
    head = {"id": f"cmpl-{subs[0].request_id}", "created": int(time.time()), "model": req.model,
            "system_fingerprint": None}
    if req.stream:
        deltas = await started([backend.deltas(sub, spec.stop, pieces=True, first_index=i * req.n)
                                for i, sub in enumerate(subs)])
        return sse_response(_completion_chunks(head, req, deltas, sum(len(p) for p in prompts)))
    generations: list[Generation] = await asyncio.gather(*(backend.result(sub) for sub in subs))
    shaped: list[tuple[Choice, str, dict[str, Any] | None]] = []  # choice, its text (echo: + prompt), logprobs
    for generation in generations:
        choices, prompt_info, prompt_text = await backend.choices(
            target, generation, spec.stop, pieces=with_logprobs, echo=req.echo)
        for c in choices:
            logprobs = _legacy(c.tokens, len(prompt_text), bool(req.logprobs)) if with_logprobs else None
            if logprobs is not None and prompt_info is not None:
                logprobs = _merge(_legacy(prompt_info, 0, bool(req.logprobs)), logprobs)
            shaped.append((c, prompt_text + c.text, logprobs))
    usage = _usage(sum(len(p) for p in prompts), [c for c, _, _ in shaped])
    return JSONResponse({**head, "object": "text_completion", "usage": usage, "choices": [
        {"index": i, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}
        for i, (c, text, logprobs) in enumerate(shaped)]})


async def _completion_chunks(head: dict[str, Any], req: CompletionRequest, deltas: AsyncIterator[list[Delta]],
                             prompt_tokens: int) -> AsyncIterator[str]:
    """(`echo` with `stream` is refused by the schema: a stream's text is the completion alone.)"""
    base = {**head, "object": "text_completion", **({"usage": None} if req.include_usage else {})}

    def chunk(index: int, text: str, logprobs: Any = None, finish: str | None = None) -> str:
        return sse_data({**base, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                              "finish_reason": finish}]})

    finals: dict[int, Choice] = {}
    try:
        async for batch in deltas:
            for d in batch:
                for piece in d.pieces:
                    tokens = (piece.token,) if piece.token is not None else ()
                    yield chunk(d.index, piece.text,
                                _legacy(tokens, 0, bool(req.logprobs)) if req.logprobs is not None else None)
                if d.final is not None:
                    finals[d.index] = d.final
                    yield chunk(d.index, "", finish=d.final.finish_reason)
    except GatewayError as exc:  # after the first chunk the status is sent: the error goes in the stream
        yield sse_data(openai_error(exc.status, exc.detail))
        return
    if req.include_usage:
        yield sse_data({**base, "choices": [], "usage": _usage(prompt_tokens, [finals[i] for i in sorted(finals)])})
    yield "data: [DONE]\n\n"
