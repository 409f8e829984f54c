"""The OpenAI-compatible API through the official `openai` client, on a real gateway + real trainers (tiny model).

The samplers are the Tinker API's own: the same prompt, parameters and seed give the same tokens, text and
logprobs through both APIs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import tinker
from tinker import types
from transformers import AutoTokenizer

from tests.component.gateway.conftest import TINY
from tests.support.sdk import GatewayProc

ALICE, BOB = "tml-alice", "tml-bob"
MESSAGES: list[Any] = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def oai(compat_gateway: GatewayProc) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=compat_gateway.url + "/oai/api/v1", api_key=ALICE, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(compat_gateway: GatewayProc) -> Iterator[tinker.ServiceClient]:
    with tinker.ServiceClient(base_url=compat_gateway.url, api_key=ALICE) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(**{"model": TINY, "messages": MESSAGES, "max_tokens": 12, "seed": 7,
                                             **kwargs})


def test_models_lists_the_base_models(oai: openai.OpenAI) -> None:
    ids = [m.id for m in oai.models.list()]
    assert TINY in ids
    assert oai.models.retrieve(TINY).id == TINY


def test_a_chat_completion_has_text_usage_and_a_finish_reason(oai: openai.OpenAI, tokenizer: Any) -> None:
    out = chat(oai)
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert out.object == "chat.completion" and out.model == TINY and len(out.choices) == 1
    assert out.choices[0].message.role == "assistant" and isinstance(out.choices[0].message.content, str)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == len(prompt)  # the model's own chat template, rendered by its trainer
    assert 1 <= out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_the_same_seed_gives_the_same_text_and_streaming_replays_it(oai: openai.OpenAI) -> None:
    first, again = chat(oai, seed=123), chat(oai, seed=123)
    assert first.choices[0].message.content == again.choices[0].message.content
    chunks = list(chat(oai, seed=123, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == first.choices[0].message.content
    assert len([d for d in deltas if d]) >= 2  # a chunk per token, not one blob
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == first.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == first.usage  # the final usage chunk


def test_n_choices_are_independent_samples(oai: openai.OpenAI) -> None:
    out = chat(oai, n=3, seed=5, max_tokens=10)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.message.content for c in out.choices}) > 1  # one RNG stream, three different rows
    streamed = list(chat(oai, n=3, seed=5, max_tokens=10, stream=True))
    for c in out.choices:
        mine = [ch.choices[0] for ch in streamed if ch.choices and ch.choices[0].index == c.index]
        text = "".join(choice.delta.content or "" for choice in mine)
        assert text == c.message.content


def test_logprobs_and_top_logprobs(oai: openai.OpenAI) -> None:
    out = chat(oai, logprobs=True, top_logprobs=3, max_tokens=8)
    content = out.choices[0].logprobs.content
    assert 1 <= len(content) <= 8
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and entry.logprob <= tops[0] + 1e-6
        assert bytes(entry.bytes or []) == entry.token.encode()
    assert chat(oai, max_tokens=8).choices[0].logprobs is None


def _ascii_stop(text: str) -> str:
    at = next((i for i, ch in enumerate(text) if i >= 2 and ch.isascii() and ch.isalnum()), None)
    assert at is not None, f"no ASCII letter or digit past position 2 in {text!r}: pick another seed"
    return text[at]


@pytest.mark.parametrize("as_list", [False, True])
def test_a_stop_string_ends_the_text_before_it(oai: openai.OpenAI, as_list: bool) -> None:
    full = chat(oai, seed=21, max_tokens=16).choices[0].message.content
    stop = _ascii_stop(full)
    out = chat(oai, seed=21, max_tokens=16, stop=[stop, "never-there"] if as_list else stop)
    assert out.choices[0].message.content == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_results_match_the_tinker_sampling_api_for_the_same_prompt_and_seed(
        oai: openai.OpenAI, sdk: tinker.ServiceClient, tokenizer: Any) -> None:
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    sampler = sdk.create_sampling_client(base_model=TINY).result()
    params = types.SamplingParams(max_tokens=10, seed=99, temperature=0.9, top_p=0.95)
    tinker_out = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=2, sampling_params=params).result()
    out = chat(oai, n=2, seed=99, temperature=0.9, top_p=0.95, max_tokens=10, logprobs=True)
    assert out.usage.completion_tokens == sum(len(s.tokens) for s in tinker_out.sequences)
    for seq, c in zip(tinker_out.sequences, out.choices, strict=True):
        assert c.message.content == tokenizer.decode(seq.tokens, skip_special_tokens=True)
        kept = [e.logprob for e in c.logprobs.content]
        assert kept and np.allclose(kept, seq.logprobs[: len(kept)], rtol=0, atol=1e-6)
        assert c.finish_reason == seq.stop_reason


def test_completions_take_text_or_token_prompts_and_echo_prompt_logprobs(
        oai: openai.OpenAI, sdk: tinker.ServiceClient, tokenizer: Any) -> None:
    ids = tokenizer("Once upon a time")["input_ids"]
    by_text = oai.completions.create(model=TINY, prompt=["Once upon a time", "hello"], n=2, max_tokens=6, seed=3)
    assert [c.index for c in by_text.choices] == [0, 1, 2, 3]
    by_ids = oai.completions.create(model=TINY, prompt=ids, n=2, max_tokens=6, seed=3)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices[:2]]
    echo = oai.completions.create(model=TINY, prompt=ids, max_tokens=1, logprobs=1, echo=True, temperature=0)
    lp = echo.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + 1
    assert echo.choices[0].text.startswith("Once upon a time")
    sampler = sdk.create_sampling_client(base_model=TINY).result()
    reference = sampler.compute_logprobs(types.ModelInput.from_ints(ids)).result()
    assert np.allclose(lp.token_logprobs[1: len(ids)], reference[1:], rtol=0, atol=1e-5)
    assert all(len(top) == 1 for top in lp.top_logprobs[1:])


def test_a_sampler_weights_path_is_the_tenants_own_or_published(oai: openai.OpenAI, sdk: tinker.ServiceClient,
                                                                 tokenizer: Any, compat_gateway: GatewayProc) -> None:
    training = sdk.create_lora_training_client(base_model=TINY, rank=4).result()
    datum = types.Datum(model_input=types.ModelInput.from_ints([5, 6, 7, 8]),
                        loss_fn_inputs={"target_tokens": np.array([6, 7, 8, 9]), "weights": np.ones(4, np.float32)})
    training.forward_backward([datum], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=0.05)).result()
    path = training.save_weights_for_sampler("oai").result().path
    assert path in [m.id for m in oai.models.list()]
    mine = chat(oai, model=path, seed=4).choices[0].message.content
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    through_tinker = sdk.create_sampling_client(model_path=path).result().sample(
        types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=12, seed=4)).result()
    assert tokenizer.decode(through_tinker.sequences[0].tokens, skip_special_tokens=True) == mine
    with openai.OpenAI(base_url=compat_gateway.url + "/oai/api/v1", api_key=BOB, max_retries=0) as bob:
        with pytest.raises(openai.NotFoundError):
            chat(bob, model=path)  # another tenant's private weights
        rest = tinker.RestClient(base_url=compat_gateway.url, api_key=ALICE)
        rest.publish_checkpoint_from_tinker_path(path).result()
        assert chat(bob, model=path, seed=4).choices[0].message.content == mine  # published: same weights


def test_a_bad_key_is_a_401_in_openai_shape(compat_gateway: GatewayProc) -> None:
    with (openai.OpenAI(base_url=compat_gateway.url + "/oai/api/v1", api_key="tml-nobody", max_retries=0) as c,
          pytest.raises(openai.AuthenticationError) as caught):
        chat(c)
    assert caught.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    response = httpx.post(compat_gateway.url + "/oai/api/v1/chat/completions", json={"model": TINY})
    assert response.status_code == 401 and "message" in response.json()["error"]


CHAT: dict[str, Any] = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize(("path", "body"), [
    ("chat/completions", {**CHAT, "temperature": 3}),
    ("chat/completions", {**CHAT, "n": 0}),
    ("chat/completions", {**CHAT, "seed": 2**64}),
    ("chat/completions", {**CHAT, "messages": []}),
    ("chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}),
    ("chat/completions", {**CHAT, "max_tokens": 100_000}),  # past the model's context: the trainer's length
    ("chat/completions", {**CHAT, "model": "tinker://nope/sampler_weights/x"}),
    ("chat/completions", {**CHAT, "model": "tinker://../etc"}),
    ("chat/completions", {**CHAT, "model": "no/such-model"}),
    ("completions", {"model": TINY, "prompt": [10**9]}),  # a token id past the vocabulary: the trainer says so
    ("completions", {"model": TINY, "prompt": "hi", "logprobs": 50}),
    ("completions", {"model": TINY, "prompt": []}),
])
def test_bad_input_is_a_4xx_in_openai_shape(compat_gateway: GatewayProc, path: str, body: dict[str, Any]) -> None:
    response = httpx.post(f"{compat_gateway.url}/oai/api/v1/{path}", json=body,
                          headers={"Authorization": f"Bearer {ALICE}"}, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"


def test_a_non_finite_number_is_a_400(compat_gateway: GatewayProc) -> None:
    response = httpx.post(f"{compat_gateway.url}/oai/api/v1/chat/completions",
                          content=b'{"model": "tinkerkube/tiny-qwen3", "messages": [{"role": "user", "content": "x"}],'
                                  b' "temperature": NaN}',
                          headers={"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"})
    assert response.status_code == 400 and "temperature" in response.json()["error"]["message"]
