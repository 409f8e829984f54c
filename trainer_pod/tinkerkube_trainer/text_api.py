"""The internal text routes (pod_api TEXT_*): chat rendering, encoding and decoding with the served model's
own tokenizer.

Why the trainer: the gateway's OpenAI/Anthropic-compatible endpoints need the model's chat template and
tokenizer, but the gateway stays free of torch and model files (its Kubernetes pod has none). The trainer
that backs a sampler already holds both, so the gateway asks it.

Small requests (a chat, a sample's tokens) run on the event loop: a thread hop costs more than the work
while the op thread holds the GIL sampling. Large ones go to a worker thread so that long-polls never wait
on them. One text at a time, never the tokenizer's batch calls: those start a Rust thread pool that
competes with torch's threads for the cores.

`add_text_routes(app, text_model)` is all a server needs: `text_model()` returns the tokenizer (and the
context length) once the model is loaded, None before (503, retry).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from tinkerkube_contract import pod_api as api
from tinkerkube_contract.pod_api import ErrorCategory

_SANE_CONTEXT = 10**8  # HF's "no limit" sentinel for model_max_length is ~1e30
_INLINE_MAX = 32_000  # characters (~4 per token): smaller requests run on the event loop, larger in a thread


@dataclass(frozen=True, slots=True)
class TextModel:
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    context_length: int | None = None


def text_model_of(engine: object) -> TextModel | None:
    """The engine's tokenizer and its model's maximum positions (config), when it has loaded them."""
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        return None
    hf_model = getattr(engine, "module", None) or getattr(engine, "model", None)  # the pool's torch module
    config = getattr(hf_model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", None)
    return TextModel(tokenizer, int(context) if context and int(context) < _SANE_CONTEXT else None)


class TextError(Exception):
    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def render_chat(model: TextModel, req: api.RenderChatRequest) -> list[int]:
    tok = model.tokenizer
    if not getattr(tok, "chat_template", None):
        raise TextError(400, "no_chat_template", "this model's tokenizer has no chat template; use completions")
    if req.continue_final_message and req.messages[-1].role != "assistant":
        raise TextError(400, "invalid_request", "continuing the final message needs it to be the assistant's")
    messages = [{"role": m.role, "content": m.content} for m in req.messages]
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=req.add_generation_prompt
                                       and not req.continue_final_message,
                                       continue_final_message=req.continue_final_message)
    except Exception as exc:  # jinja's raise_exception (roles must alternate, ...) or a malformed turn
        raise TextError(400, "chat_template_error", f"the chat template refused the messages: {exc}") from None
    # what apply_chat_template(tokenize=True) does: the template already wrote the special tokens
    return list(tok(text, add_special_tokens=False)["input_ids"])


def render_chats(model: TextModel, req: api.RenderChatsRequest) -> list[api.RenderedChat]:
    """Each chat rendered on its own: one chat's bad turn is that chat's error, not the others'."""
    out = []
    for chat in req.chats:
        try:
            out.append(api.RenderedChat(ids=render_chat(model, chat)))
        except TextError as exc:
            out.append(api.RenderedChat(error=exc.detail))
    return out


def encode(model: TextModel, req: api.EncodeRequest) -> list[list[int]]:
    tok = model.tokenizer
    return [list(tok(text, add_special_tokens=req.add_special_tokens)["input_ids"]) for text in req.texts]


def decode(model: TextModel, req: api.DecodeRequest) -> list[api.DecodedText]:
    tok = model.tokenizer
    size = len(tok)
    for i, ids in enumerate(req.sequences):
        if any(t < 0 or t >= size for t in ids):
            raise TextError(400, "token_out_of_range", f"sequences[{i}] has token ids outside [0, {size})")
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in req.sequences]
    if not req.pieces:
        return [api.DecodedText(text=t) for t in texts]
    special = set(tok.all_special_ids)
    return [api.DecodedText(text=text, pieces=[tok.decode([t]) for t in ids], special=[t in special for t in ids])
            for ids, text in zip(req.sequences, texts, strict=True)]


def _error(status: int, code: str, detail: str) -> JSONResponse:
    category = ErrorCategory.USER if status < 500 else ErrorCategory.SERVER
    headers = {"x-should-retry": "true"} if status == 503 else None
    body = api.ErrorBody(detail=detail, code=code, category=category).model_dump(mode="json")
    return JSONResponse(body, status_code=status, headers=headers)


def add_text_routes(app: FastAPI, text_model: Callable[[], TextModel | None]) -> None:
    router = APIRouter()

    async def answer(fn: Callable[[TextModel], Any], wrap: Callable[[Any, TextModel], BaseModel],
                     size: int) -> Response:
        model = text_model()
        if model is None:
            return _error(503, "not_ready", "the trainer is still loading its model; retry shortly")
        try:
            result = await asyncio.to_thread(fn, model) if size > _INLINE_MAX else fn(model)
        except TextError as exc:
            return _error(exc.status, exc.code, exc.detail)
        return JSONResponse(wrap(result, model).model_dump(mode="json"))

    @router.post(api.TEXT_CHAT_PATH)
    async def chat(req: api.RenderChatsRequest) -> Response:
        return await answer(lambda m: render_chats(m, req), lambda chats, m: api.RenderedChats(
            chats=chats, context_length=m.context_length), sum(len(x.content) for c in req.chats for x in c.messages))

    @router.post(api.TEXT_ENCODE_PATH)
    async def encode_texts(req: api.EncodeRequest) -> Response:
        return await answer(lambda m: encode(m, req), lambda ids, m: api.TokenIds(
            ids=ids, context_length=m.context_length), sum(len(t) for t in req.texts))

    @router.post(api.TEXT_DECODE_PATH)
    async def decode_ids(req: api.DecodeRequest) -> Response:
        return await answer(lambda m: decode(m, req), lambda seqs, m: api.DecodedTexts(
            sequences=seqs, context_length=m.context_length), sum(len(ids) for ids in req.sequences) * 4)

    app.include_router(router)
