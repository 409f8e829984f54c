"""Every field of the compatible APIs that reaches the sampler is bounded: bad input is a 400, not a 5xx."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from tinkerkube_gateway.compat.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    MessagesRequest,
    stops_of,
)
from tinkerkube_gateway.errors import InvalidRequest
from tinkerkube_gateway.wire import parse_json

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION: dict[str, Any] = {"model": "m", "prompt": "hi"}
MESSAGES: dict[str, Any] = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}

BAD_SAMPLING = [
    {"n": 0}, {"n": 129}, {"n": 1.5}, {"max_tokens": 0}, {"max_tokens": -1}, {"max_tokens": 10**7},
    {"temperature": -0.1}, {"temperature": 2.5}, {"top_p": 1.5}, {"top_p": -0.1}, {"top_k": -2},
    {"top_k": 10**7}, {"seed": 2**63}, {"seed": -(2**63) - 1}, {"seed": "x"}, {"stop": ["a"] * 17},
    {"stop": "x" * 1001}, {"stop": 5}, {"presence_penalty": 1.0}, {"frequency_penalty": -3},
    {"logit_bias": {"5": 1}}, {"response_format": {"type": "json_object"}}, {"model": ""}, {"model": None},
]
BAD_CHAT = [
    *BAD_SAMPLING, {"messages": []}, {"messages": [{"role": "robot", "content": "x"}]},
    {"messages": [{"role": "user"}]}, {"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"messages": [{"role": "user", "content": "x"}] * 1025}, {"tools": [{"type": "function"}]},
    {"tool_choice": "required"}, {"top_logprobs": 3}, {"logprobs": True, "top_logprobs": 21},
    {"max_completion_tokens": 0},
]
BAD_COMPLETION = [
    *BAD_SAMPLING, {"prompt": ""}, {"prompt": []}, {"prompt": [[]]}, {"prompt": [-1]}, {"prompt": [2**31]},
    {"prompt": [1.5]}, {"prompt": ["a"] * 129}, {"prompt": ["a", "b"], "n": 65},
    {"logprobs": 21}, {"logprobs": -1}, {"suffix": "x"}, {"best_of": 3}, {"echo": True, "stream": True},
]
BAD_MESSAGES = [
    {"max_tokens": 0}, {"max_tokens": None}, {"temperature": 1.5}, {"temperature": -1}, {"top_p": 2}, {"top_k": 0},
    {"stop_sequences": ["a"] * 17}, {"messages": []}, {"messages": [{"role": "system", "content": "x"}]},
    {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
    {"system": [{"type": "image"}]}, {"tools": [{"name": "t"}]}, {"thinking": {"type": "enabled"}},
]


def _check_refused(model: type[BaseModel], base: dict[str, Any], change: dict[str, Any]) -> None:
    body = json.dumps({**base, **change}).encode()
    with pytest.raises(InvalidRequest):
        parse_json(body, model)


@pytest.mark.parametrize("change", BAD_CHAT, ids=str)
def test_chat_refuses(change: dict[str, Any]) -> None:
    _check_refused(ChatCompletionRequest, CHAT, change)


@pytest.mark.parametrize("change", BAD_COMPLETION, ids=str)
def test_completions_refuse(change: dict[str, Any]) -> None:
    _check_refused(CompletionRequest, COMPLETION, change)


@pytest.mark.parametrize("change", BAD_MESSAGES, ids=str)
def test_messages_refuse(change: dict[str, Any]) -> None:
    _check_refused(MessagesRequest, MESSAGES, change)


@pytest.mark.parametrize("raw", [b"{\"model\": \"m\", \"messages\": [], \"temperature\": NaN}",
                                 b"{\"model\": \"m\", \"temperature\": Infinity}", b"[1]", b"not json", b"\xff"])
def test_non_finite_numbers_and_non_objects_are_refused(raw: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_json(raw, ChatCompletionRequest)


def test_good_requests_parse_with_openai_defaults() -> None:
    chat = parse_json(json.dumps({**CHAT, "max_completion_tokens": 7, "max_tokens": 3, "stop": "x",
                                  "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                                 {"type": "text", "text": "b"}]}],
                                  "stream_options": {"include_usage": True}, "unknown_new_field": 1}).encode(),
                      ChatCompletionRequest)
    assert chat.token_limit == 7 and chat.include_usage
    assert (chat.messages[0].template_role, chat.messages[0].text()) == ("system", "ab")
    completion = parse_json(json.dumps(COMPLETION).encode(), CompletionRequest)
    assert completion.max_tokens == 16 and completion.prompts() == ["hi"]
    assert parse_json(json.dumps({**COMPLETION, "prompt": [1, 2]}).encode(), CompletionRequest).prompts() == [[1, 2]]
    assert parse_json(json.dumps({**COMPLETION, "prompt": [[1], [2]]}).encode(),
                      CompletionRequest).prompts() == [[1], [2]]
    messages = parse_json(json.dumps({**MESSAGES, "system": [{"type": "text", "text": "s"}]}).encode(),
                          MessagesRequest)
    assert messages.system_text() == "s" and messages.temperature == 1.0


def test_stops_drop_empty_strings() -> None:
    assert stops_of(None) == () and stops_of("") == () and stops_of(["a", "", "b"]) == ("a", "b")
