"""Live streaming on the OpenAI/Anthropic-compatible APIs: the official clients against a real gateway and a real
trainer (tiny model). Tokens leave as the sampler decodes them: the first chunk arrives while the trainer still
reports the sample unfinished; the joined stream is the non-streamed text; a stop string split over tokens never
shows; a client that goes away frees the sampler (its sample is cancelled on the trainer)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.component.gateway.conftest import TINY
from tests.support.sdk import GatewayProc
from tinkerkube_contract import pod_api

ALICE = "tml-alice"
MESSAGES: list[Any] = [{"role": "user", "content": "Tell me a long story"}]
GREEDY = {"temperature": 0}  # as an extra body field: this anthropic client's stream() takes no temperature
LONG = 1500  # tokens: greedy decoding of the tiny model runs to max_tokens on MESSAGES (asserted where relied on)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def oai(compat_gateway: GatewayProc) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=compat_gateway.url + "/oai/api/v1", api_key=ALICE, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def claude(compat_gateway: GatewayProc) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=compat_gateway.url + "/anthropic/api", api_key=ALICE, max_retries=0) as client:
        yield client


class Trainer:
    """The tenant's sampler pool, read over the pod API (its address and token from the gateway's state)."""

    def __init__(self, state_dir: Path) -> None:
        found = [json.loads(p.read_text()) for p in state_dir.rglob("*.pool.json")]
        pools = [s for s in found if s.get("tenant") == "alice"]
        assert len(pools) == 1, f"expected alice's one sampler pool, found {found}"
        self.http = httpx.Client(base_url=pools[0]["url"], headers={pod_api.HEADER_TOKEN: pools[0]["token"]},
                                 timeout=60)

    def sample(self, request_id: str, wait: float = 0.0) -> httpx.Response:
        return self.http.get(pod_api.sample_path(request_id), params={"wait": wait})

    def progress(self, request_id: str, after: int = 0) -> pod_api.SampleProgress:
        reply = self.http.get(pod_api.sample_progress_path(request_id), params={"after": after, "wait": 0})
        assert reply.status_code == 200, reply.text
        return pod_api.SampleProgress.model_validate_json(reply.content)


@pytest.fixture(scope="module")
def trainer(oai: openai.OpenAI, compat_gateway: GatewayProc) -> Iterator[Trainer]:
    oai.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=1)  # starts the sampler pool
    t = Trainer(compat_gateway.state_dir)
    yield t
    t.http.close()


def _joined(chunks: list[Any]) -> dict[int, str]:
    """Each choice's streamed text (chat chunks carry `delta.content`, completion chunks `text`)."""
    out: dict[int, str] = {}
    for c in chunks:
        for choice in c.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            out[choice.index] = out.get(choice.index, "") + (piece or "")
    return out


def test_the_stream_is_the_non_streamed_text_for_the_same_seed(oai: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": TINY, "messages": MESSAGES, "max_tokens": 40, "seed": 11, "n": 2,
                            "temperature": 1.0, "logprobs": True, "top_logprobs": 2}
    whole = oai.chat.completions.create(**args)
    chunks = list(oai.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert _joined(chunks) == {c.index: c.message.content for c in whole.choices}
    assert chunks[-1].usage == whole.usage
    finish = {ch.index: ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    for c in whole.choices:  # one logprob entry per kept token, the same ones, in order
        streamed = [e for ch in chunks for x in ch.choices if x.index == c.index and x.logprobs
                    for e in x.logprobs.content]
        assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in c.logprobs.content]
        assert all(len(e.top_logprobs) == 2 for e in streamed)
    text = oai.completions.create(model=TINY, prompt=["Once upon", "a time"], n=2, max_tokens=30, seed=4)
    streamed = list(oai.completions.create(model=TINY, prompt=["Once upon", "a time"], n=2, max_tokens=30, seed=4,
                                           stream=True))
    assert _joined(streamed) == {c.index: c.text for c in text.choices}


def test_the_first_chunk_arrives_while_the_trainer_still_decodes(oai: openai.OpenAI, trainer: Trainer) -> None:
    args: dict[str, Any] = {"model": TINY, "messages": MESSAGES, "max_tokens": LONG, "temperature": 0}
    stream = oai.chat.completions.create(**args, stream=True)
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            break
    request_id = chunks[0].id.removeprefix("chatcmpl-")
    on_trainer = trainer.sample(request_id)
    assert on_trainer.headers[pod_api.HEADER_OP_STATE] == "pending", "the first chunk came after the whole sample"
    seen = trainer.progress(request_id)
    assert seen.state == "pending" and 0 < seen.next < LONG
    chunks += list(stream)
    whole = oai.chat.completions.create(**args)
    assert whole.choices[0].finish_reason == "length"  # the premise: greedy decoding runs to max_tokens here
    assert _joined(chunks) == {0: whole.choices[0].message.content}
    assert trainer.sample(request_id, wait=30).headers[pod_api.HEADER_OP_STATE] == "complete"


def test_a_stop_string_split_over_tokens_never_shows(oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    args: dict[str, Any] = {"model": TINY, "messages": MESSAGES, "max_tokens": 60, "temperature": 0}
    whole = oai.chat.completions.create(**args, logprobs=True)
    tokens = whole.choices[0].logprobs.content
    text = whole.choices[0].message.content
    # A stop string spanning two tokens (the last character of one, the first of the next), found only there.
    pairs = [a.token[-1] + b.token[0] for a, b in itertools.pairwise(tokens[3:])
             if a.token and b.token and "\ufffd" not in a.token + b.token]
    stop = next((pair for pair in pairs if text.count(pair) == 1), None)
    assert stop is not None, f"no stop string spans two tokens once in {text!r}: change MESSAGES"
    expected = text[: text.index(stop)]
    chunks = list(oai.chat.completions.create(**args, stop=stop, stream=True))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    with claude.messages.stream(model=TINY, max_tokens=60, messages=MESSAGES, stop_sequences=[stop],
                                extra_body=GREEDY) as events:
        said = "".join(events.text_stream)
        message = events.get_final_message()
    assert said == expected and message.stop_reason == "stop_sequence" and message.stop_sequence == stop


def test_anthropic_streams_the_non_streamed_message(claude: anthropic.Anthropic) -> None:
    args: dict[str, Any] = {"model": TINY, "max_tokens": 30, "messages": MESSAGES, "extra_body": GREEDY}
    whole = claude.messages.create(**args)
    with claude.messages.stream(**args) as events:
        said = "".join(events.text_stream)
        final = events.get_final_message()
    assert said == whole.content[0].text
    assert (final.stop_reason, final.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens)


def test_a_client_that_goes_away_frees_the_sampler(oai: openai.OpenAI, trainer: Trainer) -> None:
    stream = oai.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=LONG, temperature=0, stream=True)
    first = next(c for c in stream if c.choices and c.choices[0].delta.content)
    request_id = first.id.removeprefix("chatcmpl-")
    stream.close()  # the connection goes away mid-stream
    ended = trainer.sample(request_id, wait=30)
    assert ended.headers[pod_api.HEADER_OP_STATE] == "failed", ended.text  # stopped, not decoded to the end
    assert "cancelled" in ended.json()["error"]
    again = oai.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=5, seed=1)  # nothing stuck
    assert again.choices[0].message.content is not None
