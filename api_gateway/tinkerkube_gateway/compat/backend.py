"""Tokenize, sample and detokenize for the compatible APIs: typed values in and out, no HTTP shapes.

A request goes: `target` (model → the tenant's sampler, through `CompatSamplers`, and the trainer behind
it) → `render_chat` / `encode` on that trainer → `generate` (a Tinker sample future through
`SamplingService`, exactly as `asample` makes one, awaited like `retrieve_future` awaits it) → `decode`
on that trainer.

Streaming: `stream` reads the sample's progress from its trainer (a long-poll per read, see pod_api's
`SampleProgress`) and yields a partial `Generation` (every token so far) after each read that brought new
tokens, then the final one, read exactly as `generate` reads it, so that a stream ends on the same tokens
as the same request without `stream`. A client that goes away cancels its sample (`CancelService`: the
future fails and the trainer drops its rows), so nothing keeps decoding for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from tinker.proto.response_conv import deserialize_sample_response

from tinkerkube_contract import pod_api
from tinkerkube_contract.pod_api import ErrorCategory
from tinkerkube_gateway.backends.base import TrainerHandle
from tinkerkube_gateway.clients.pod_client import OpRejected, TrainerUnreachable
from tinkerkube_gateway.compat.coalesce import Coalescer
from tinkerkube_gateway.compat.increments import ChoiceStreams, Delta
from tinkerkube_gateway.compat.samplers import CompatSamplers
from tinkerkube_gateway.compat.shaping import Choice, TokenInfo, choice, prompt_tokens, top_ids
from tinkerkube_gateway.compat.values import Generation, Sampled, SampleSpec, TopList
from tinkerkube_gateway.errors import InvalidRequest, TrainerUnavailable
from tinkerkube_gateway.schemas import SampleRequest
from tinkerkube_gateway.services.cancel import CancelService
from tinkerkube_gateway.services.futures import FuturesService
from tinkerkube_gateway.services.sampling import SamplingService
from tinkerkube_gateway.store.records import FutureState, SamplerRecord

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
FALLBACK_MAX_TOKENS = 4096  # when neither the request nor the model's context length bounds it
RENDER_WINDOW_SECONDS = 0.01  # how long a chat waits for concurrent requests' chats to share its render call
NOT_SENT_WAIT_SECONDS = (0.01, 1.0)  # a sample its trainer does not know yet (queued here): re-read after these
# Progress reads of one stream start at most this often: the first answers as soon as a token is decoded, later
# ones bring the tokens decoded meanwhile; a sample that ends meanwhile ends the pause (FuturesService.pause).
# Each read is two trainer requests (the long-poll, and a decode of the tokens so far), served on the trainer's
# event loop beside its decode thread, whose GIL they take: reading after every token made a streamed sample
# ~3.6x slower than the same request without stream on the tiny model (bench/openai_compat.py); at 50 ms the
# trainer's event loop still held ~20% of its GIL samples (py-spy --gil; 1% without stream). 100 ms: 10 updates
# a second, half the reads.
READ_INTERVAL_SECONDS = 0.1


@dataclass(frozen=True, slots=True)
class Target:
    tenant: str
    model: str
    sampler: SamplerRecord
    handle: TrainerHandle


@dataclass(frozen=True, slots=True)
class Submitted:
    """A sample request sent on its way: what reading its progress and its result needs."""

    target: Target
    request_id: str
    prompt: list[int]
    n: int


class CompatBackend:
    def __init__(self, samplers: CompatSamplers, sampling: SamplingService, futures: FuturesService,
                 cancels: CancelService):
        self.samplers = samplers
        self.sampling = sampling
        self.futures = futures
        self.cancels = cancels
        self._cancelling: set[asyncio.Task[Any]] = set()
        self.dispatcher = sampling.dispatcher
        self._renders: Coalescer[pod_api.RenderChatRequest, pod_api.RenderedChat] = Coalescer(
            window=RENDER_WINDOW_SECONDS, limit=pod_api.MAX_TEXT_ITEMS)
        self._context: dict[str, int | None] = {}  # backing model id → its context length (never changes)

    async def target(self, tenant: str, model: str) -> Target:
        sampler = await self.samplers.sampler(tenant, model)
        try:
            handle = await self.dispatcher.trainer_handle(sampler.backing_model_id, sampler.sampler_id)
        except (TrainerUnreachable, TimeoutError) as exc:
            self.samplers.forget(tenant, model)
            raise TrainerUnavailable(f"the sampler for {model} is not available: {exc}; retry") from None
        return Target(tenant, model, sampler, handle)

    async def _text(self, target: Target, path: str, body: BaseModel, reply: type[M]) -> M:
        try:
            return await self.dispatcher.pods.post_json(target.handle, path, body, reply)
        except OpRejected as exc:
            if exc.category is ErrorCategory.USER:
                raise InvalidRequest(exc.detail) from None
            raise TrainerUnavailable(f"the sampler's trainer refused a text request: {exc.detail}") from None
        except (TrainerUnreachable, TimeoutError) as exc:
            self.samplers.forget(target.tenant, target.model)
            raise TrainerUnavailable(f"the sampler's trainer is unreachable: {exc}; retry") from None

    async def render_chat(self, target: Target, messages: list[tuple[str, str]], *,
                          continue_final: bool = False) -> tuple[list[int], int | None]:
        """The chat's prompt tokens and the model's context length. Concurrent requests' chats for the
        same trainer go in one call (see coalesce), so that their samples can share a sampling pass."""
        try:
            req = pod_api.RenderChatRequest(messages=[pod_api.ChatMessage(role=r, content=c) for r, c in messages],
                                            continue_final_message=continue_final)
        except ValidationError as exc:  # e.g. a system prompt on top of the most messages a chat may have
            raise InvalidRequest(f"the chat cannot be rendered: {exc.errors()[0]['msg']}") from None
        backing = target.sampler.backing_model_id

        async def call(chats: list[pod_api.RenderChatRequest]) -> list[pod_api.RenderedChat]:
            out = await self._text(target, pod_api.TEXT_CHAT_PATH, pod_api.RenderChatsRequest(chats=chats),
                                   pod_api.RenderedChats)
            self._context[backing] = out.context_length
            return out.chats

        rendered = await self._renders.submit(f"{target.handle.url} {backing}", req, call)
        if rendered.error is not None:
            raise InvalidRequest(rendered.error)
        return rendered.ids, self._context.get(backing)

    async def encode(self, target: Target, texts: list[str]) -> tuple[list[list[int]], int | None]:
        out = await self._text(target, pod_api.TEXT_ENCODE_PATH, pod_api.EncodeRequest(texts=texts),
                               pod_api.TokenIds)
        self._context[target.sampler.backing_model_id] = out.context_length
        return out.ids, out.context_length

    async def context_length(self, target: Target) -> int | None:
        """The model's context length: known from any earlier text call to its trainer, else asked once
        (a decode of nothing)."""
        backing = target.sampler.backing_model_id
        if backing not in self._context:
            self._context[backing] = (await self.decode(target, [[]], pieces=False)).context_length
        return self._context[backing]

    async def decode(self, target: Target, sequences: list[list[int]], *, pieces: bool) -> pod_api.DecodedTexts:
        return await self._text(target, pod_api.TEXT_DECODE_PATH,
                                pod_api.DecodeRequest(sequences=sequences, pieces=pieces), pod_api.DecodedTexts)

    async def generate(self, target: Target, prompt: list[int], spec: SampleSpec,
                       context_length: int | None) -> Generation:
        return await self.result(await self.submit(target, prompt, spec, context_length))

    async def submit(self, target: Target, prompt: list[int], spec: SampleSpec,
                     context_length: int | None) -> Submitted:
        """The sample, as `asample` makes one (bad input and backpressure raise here, before any answer)."""
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        max_tokens = _token_budget(len(prompt), spec.max_tokens, context_length)
        raw = _sample_request(target.sampler.sampler_id, prompt, spec, max_tokens)
        fut, _ = await self.sampling.sample(target.tenant, SampleRequest.model_validate(raw), raw)
        return Submitted(target, fut.request_id, prompt, spec.n)

    async def result(self, sub: Submitted) -> Generation:
        target = sub.target
        record = await self.futures.wait(target.tenant, sub.request_id)
        while record.state == FutureState.PENDING:
            record = await self.futures.wait(target.tenant, sub.request_id)
        if record.state == FutureState.FAILED:
            if record.category == ErrorCategory.USER.value:
                raise InvalidRequest(record.error or "the sampler refused the request")
            self.samplers.forget(target.tenant, target.model)
            raise TrainerUnavailable(f"sampling failed: {record.error}")
        return _generation(sub.prompt, record.result or b"")

    async def stream(self, sub: Submitted) -> AsyncIterator[tuple[Generation, bool]]:
        """(every token so far, False) after each progress read that brought tokens, then (the result, True).
        Closed early (the client went away), it cancels the sample."""
        rows = [Sampled([], [], [], False) for _ in range(sub.n)]  # grown in place: a row only ever gets longer
        after, finished = 0, False
        loop = asyncio.get_running_loop()
        read_at = loop.time()
        try:
            while (step := await self._progress(sub, after)) is not None:
                if step.next <= after or len(step.sequences) != sub.n:
                    continue  # the long-poll ran out with nothing new
                for row, seq in zip(rows, step.sequences, strict=True):
                    row.tokens.extend(seq.tokens)
                    row.logprobs.extend(seq.logprobs)
                    row.top.extend([list(r) for r in seq.top or ()])  # type: ignore[union-attr]
                after = step.next
                partial = [Sampled(list(r.tokens), list(r.logprobs), list(r.top or ()) or None, False) for r in rows]
                yield Generation(sub.prompt, partial), False
                pause = max(0.0, read_at + READ_INTERVAL_SECONDS - loop.time())
                await self.futures.pause(sub.request_id, pause)  # cut short when the sample ends
                read_at = loop.time()
            final = await self.result(sub)
            finished = True
            yield final, True
        finally:
            if not finished:
                self._cancel(sub)

    async def deltas(self, sub: Submitted, stops: tuple[str, ...], *, pieces: bool,
                     first_index: int = 0) -> AsyncIterator[list[Delta]]:
        """The sample's choices as stream deltas (see increments): after each read that brought tokens,
        then the last delta of every choice."""
        streams = ChoiceStreams(stops, first_index)
        async with contextlib.aclosing(self.stream(sub)) as generations:
            async for generation, final in generations:
                shaped, _, _ = await self.choices(sub.target, generation, stops, pieces=pieces)
                yield streams.end(shaped) if final else streams.grow(shaped)

    async def _progress(self, sub: Submitted, after: int) -> pod_api.SampleProgress | None:
        """The next read of the sample's progress; None once it finished (or its trainer cannot say: the
        result then tells what happened)."""
        delay = NOT_SENT_WAIT_SECONDS[0]
        while True:
            try:
                step = await self.dispatcher.pods.sample_progress(sub.target.handle, sub.request_id, after)
            except OpRejected as exc:
                if exc.status != 404:
                    return None
                record = await self.futures.wait(sub.target.tenant, sub.request_id, timeout=delay)  # not sent yet
                if record.state != FutureState.PENDING:
                    return None
                delay = min(delay * 2, NOT_SENT_WAIT_SECONDS[1])
                continue
            except (TrainerUnreachable, TimeoutError):
                return None
            return step if step.state == pod_api.OpState.PENDING else None

    def _cancel(self, sub: Submitted) -> None:
        """The reader went away mid-stream: cancel its sample (in a task of its own: this may run inside a
        cancelled request task, which can await nothing more)."""
        async def cancel() -> None:
            try:
                await self.cancels.cancel(sub.target.tenant, sub.request_id)
            except Exception:
                log.warning("could not cancel the abandoned stream's sample %s", sub.request_id, exc_info=True)

        task = asyncio.ensure_future(cancel())
        self._cancelling.add(task)
        task.add_done_callback(self._cancelling.discard)

    async def choices(self, target: Target, generation: Generation, stops: tuple[str, ...], *, pieces: bool,
                      echo: bool = False) -> tuple[list[Choice], tuple[TokenInfo, ...] | None, str]:
        """Decode (one trainer call: the sequences, the top-logprob ids and, for `echo`, the prompt) and
        shape: the choices, the prompt's tokens (echo) and the prompt's text (echo, else "")."""
        tops = top_ids(generation)
        seqs = [s.tokens for s in generation.sequences]
        rows = seqs + [tops] + ([generation.prompt] if echo else [])  # one row names every top-logprob id
        decoded = (await self.decode(target, rows, pieces=pieces or echo or bool(tops))).sequences
        names = dict(zip(tops, decoded[len(seqs)].pieces or [], strict=False))
        shaped = [choice(seq, text, stops, names) for seq, text in zip(generation.sequences, decoded, strict=False)]
        if not echo:
            return shaped, None, ""
        return shaped, prompt_tokens(generation, decoded[-1], names), decoded[-1].text


async def started(streams: list[AsyncIterator[list[Delta]]]) -> AsyncIterator[list[Delta]]:
    """Waits for every stream's first deltas, so that a request the sampler refuses gets its error as the
    answer's status (not inside a 200 stream), then yields them all, one stream after the other (the
    later samples decode meanwhile: their first read brings every token so far)."""
    try:
        results = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
    except BaseException:
        for s in streams:
            await s.aclose()  # type: ignore[attr-defined]
        raise
    firsts: list[list[Delta]] = results  # type: ignore[assignment]

    async def rest() -> AsyncIterator[list[Delta]]:
        try:
            for first, stream in zip(firsts, streams, strict=True):
                yield first
                async for deltas in stream:
                    yield deltas
        finally:
            for s in streams:
                await s.aclose()  # type: ignore[attr-defined]

    return rest()


def _token_budget(prompt_len: int, asked: int | None, context_length: int | None) -> int:
    if context_length is None:
        return asked if asked is not None else FALLBACK_MAX_TOKENS
    room = context_length - prompt_len
    if room <= 0:
        raise InvalidRequest(f"the prompt is {prompt_len} tokens; this model's context length is {context_length}")
    if asked is not None and asked > room:
        raise InvalidRequest(f"this model's maximum context length is {context_length} tokens; the prompt is "
                             f"{prompt_len} tokens and {asked} were asked for: reduce max_tokens or the prompt")
    return asked if asked is not None else room


def _sample_request(sampler_id: str, prompt: list[int], spec: SampleSpec, max_tokens: int) -> dict[str, Any]:
    """The Tinker SampleRequest JSON, as the SDK would send it (seq_id None: these are not retried)."""
    greedy = spec.top_p == 0  # OpenAI allows top_p=0: the nucleus is the single best token
    return {
        "sampling_session_id": sampler_id, "seq_id": None, "num_samples": spec.n,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
        "sampling_params": {"max_tokens": max_tokens, "temperature": 0.0 if greedy else spec.temperature,
                            "top_p": 1.0 if greedy else spec.top_p, "top_k": spec.top_k if spec.top_k > 0 else -1,
                            "seed": spec.seed, "stop": list(spec.stop) or None},
        "topk_sample_logprobs": spec.top_logprobs, "prompt_logprobs": spec.prompt_logprobs,
        "topk_prompt_logprobs": spec.top_logprobs if spec.prompt_logprobs else 0,
    }


def _top_rows(topk: Any) -> list[TopList] | None:
    if topk is None:
        return None
    return [list(zip(ids.tolist(), lps.tolist(), strict=True)) for ids, lps in zip(topk.token_ids, topk.logprobs,
                                                                                    strict=True)]


def _generation(prompt: list[int], body: bytes) -> Generation:
    """The trainer's protobuf SampleResponse, decoded with the SDK's own converter."""
    response = deserialize_sample_response(body)
    sequences = [Sampled(tokens=seq.tokens_np.tolist(),
                         logprobs=[] if seq.logprobs_np is None else seq.logprobs_np.tolist(),
                         top=_top_rows(seq.topk_logprobs_np), stopped=seq.stop_reason == "stop")
                 for seq in response.sequences]
    prompt_lps = None
    if response.prompt_logprobs_np is not None:
        prompt_lps = [None if lp != lp else float(lp) for lp in response.prompt_logprobs_np.tolist()]  # NaN: none
    return Generation(prompt, sequences, prompt_lps, _top_rows(response.topk_prompt_logprobs_np))
