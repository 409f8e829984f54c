"""The Anthropic-compatible Messages API through the official `anthropic` client, on a real gateway + real
trainers (tiny model). Sampling parameters the client no longer names (temperature, top_k, ...) go in
`extra_body`, as the Messages API still takes them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from tests.component.gateway.conftest import TINY
from tests.support.sdk import GatewayProc

ALICE = "tml-alice"
MESSAGES: list[Any] = [{"role": "user", "content": "Tell me a story"}]
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def claude(compat_gateway: GatewayProc) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=compat_gateway.url + "/anthropic/api", api_key=ALICE, max_retries=0) as client:
        yield client


def create(client: anthropic.Anthropic, **kwargs: Any) -> Any:
    extra = {**GREEDY, **kwargs.pop("extra_body", {})}
    return client.messages.create(**{"model": TINY, "max_tokens": 12, "messages": MESSAGES, **kwargs},
                                  extra_body=extra)


def test_a_message_has_text_usage_and_a_stop_reason(claude: anthropic.Anthropic) -> None:
    out = create(claude)
    assert out.type == "message" and out.role == "assistant" and out.model == TINY
    assert out.content[0].type == "text" and isinstance(out.content[0].text, str)
    assert out.stop_reason in ("end_turn", "max_tokens") and out.stop_sequence is None
    assert 1 <= out.usage.output_tokens <= 12
    assert claude.messages.count_tokens(model=TINY, messages=MESSAGES).input_tokens == out.usage.input_tokens


def test_the_system_prompt_reaches_the_chat_template(claude: anthropic.Anthropic) -> None:
    plain, with_system = create(claude), create(claude, system="You are a pirate who answers in verse.")
    assert with_system.usage.input_tokens > plain.usage.input_tokens + 5


def test_greedy_is_deterministic_and_streaming_replays_it_as_anthropic_events(claude: anthropic.Anthropic) -> None:
    whole = create(claude)
    with claude.messages.stream(model=TINY, max_tokens=12, messages=MESSAGES, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens


def test_the_stream_follows_the_messages_event_sequence(compat_gateway: GatewayProc) -> None:
    body = {"model": TINY, "max_tokens": 8, "messages": MESSAGES, "stream": True, **GREEDY}
    response = httpx.post(compat_gateway.url + "/anthropic/api/v1/messages", json=body,
                          headers={"x-api-key": ALICE}, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [(block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1].removeprefix("data: ")))
              for block in response.text.strip().split("\n\n")]
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) <= {"ping", "content_block_delta"} and "content_block_delta" in names
    assert all(data["type"] == name for name, data in events)
    assert events[-2][1]["delta"]["stop_reason"] in ("end_turn", "max_tokens")


def test_a_stop_sequence_ends_the_text_and_is_named(claude: anthropic.Anthropic) -> None:
    full = create(claude, max_tokens=16).content[0].text
    at = next((i for i, ch in enumerate(full) if i >= 2 and ch.isascii() and ch.isalnum()), None)
    assert at is not None, f"no ASCII letter or digit past position 2 in {full!r}"
    out = create(claude, max_tokens=16, stop_sequences=[full[at], "never-there"])
    assert out.content[0].text == full[: full.index(full[at])]
    assert (out.stop_reason, out.stop_sequence) == ("stop_sequence", full[at])


def test_top_k_one_is_greedy_at_any_temperature(claude: anthropic.Anthropic) -> None:
    sampled = create(claude, extra_body={"temperature": 1.0, "top_k": 1})
    assert sampled.content[0].text == create(claude).content[0].text


def test_an_assistant_turn_last_is_a_prefill_the_answer_continues(claude: anthropic.Anthropic) -> None:
    messages = [*MESSAGES, {"role": "assistant", "content": "Once upon"}]
    out = create(claude, messages=messages)
    assert out.usage.input_tokens > create(claude).usage.input_tokens  # the prefill is in the prompt


def test_bearer_auth_works_and_a_bad_key_is_a_401(compat_gateway: GatewayProc) -> None:
    url = compat_gateway.url + "/anthropic/api"
    with anthropic.Anthropic(base_url=url, auth_token=ALICE, api_key=None, max_retries=0) as bearer:
        assert create(bearer).content
    with (anthropic.Anthropic(base_url=url, api_key="tml-nobody", max_retries=0) as bad,
          pytest.raises(anthropic.AuthenticationError) as caught):
        create(bad)
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


@pytest.mark.parametrize("change", [
    {"max_tokens": 0}, {"temperature": 1.5}, {"top_k": 0}, {"top_p": 2}, {"messages": []},
    {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}]},
    {"stop_sequences": ["x"] * 17}, {"max_tokens": 100_000}, {"model": "no/such-model"},
    {"system": "s", "messages": [{"role": "user", "content": "x"}] * 1024},  # one turn more than a chat may have
])
def test_bad_input_is_a_4xx_in_anthropic_shape(compat_gateway: GatewayProc, change: dict[str, Any]) -> None:
    body = {"model": TINY, "max_tokens": 4, "messages": MESSAGES, **change}
    response = httpx.post(compat_gateway.url + "/anthropic/api/v1/messages", json=body,
                          headers={"x-api-key": ALICE}, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    data = response.json()
    assert data["type"] == "error" and data["error"]["type"] in ("invalid_request_error", "not_found_error")
    assert data["error"]["message"]
