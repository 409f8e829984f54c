"""The trainer's text routes (pod_api TEXT_*) with the tiny model's real tokenizer: the chat template renders
and encodes exactly as transformers does, decoding round-trips, and bad input is a JSON 4xx."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from transformers import AutoTokenizer

from tinkerkube_contract import pod_api as api
from tinkerkube_trainer.http_api import _install_error_handlers  # the trainer app's own 4xx handlers
from tinkerkube_trainer.metrics import TrainerMetrics
from tinkerkube_trainer.text_api import TextModel, add_text_routes, text_model_of

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> object:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
async def client(tokenizer: object) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    add_text_routes(app, lambda: TextModel(tokenizer, 64))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://trainer") as http:
        yield http


async def test_chat_renders_the_tokenizers_own_template_with_the_generation_prompt(
        client: httpx.AsyncClient, tokenizer: object) -> None:
    response = await client.post(api.TEXT_CHAT_PATH, json={"chats": [{"messages": MESSAGES}]})
    assert response.status_code == 200, response.text
    out = api.RenderedChats.model_validate(response.json())
    expected = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)  # type: ignore[attr-defined]
    assert [c.ids for c in out.chats] == [list(expected["input_ids"])] and out.context_length == 64
    text = tokenizer.decode(out.chats[0].ids)  # type: ignore[attr-defined]
    assert text.endswith("<|im_start|>assistant\n") and "Be brief." in text


async def test_continuing_the_final_assistant_turn_is_a_prefill(client: httpx.AsyncClient, tokenizer: object) -> None:
    messages = [*MESSAGES, {"role": "assistant", "content": "Sure, here"}]
    chats = [{"messages": messages, "continue_final_message": True},
             {"messages": MESSAGES, "continue_final_message": True}]  # the second has no assistant turn to continue
    response = await client.post(api.TEXT_CHAT_PATH, json={"chats": chats})
    assert response.status_code == 200, response.text
    first, second = api.RenderedChats.model_validate(response.json()).chats
    assert tokenizer.decode(first.ids).endswith("Sure, here") and first.error is None  # type: ignore[attr-defined]
    assert second.ids == [] and "assistant" in (second.error or "")  # its own error, not the whole call's


async def test_encode_then_decode_round_trips_with_pieces_and_special_flags(client: httpx.AsyncClient) -> None:
    encoded = await client.post(api.TEXT_ENCODE_PATH, json={"texts": ["hello world", "abc"]})
    ids = encoded.json()["ids"]
    assert len(ids) == 2 and all(ids)
    eos = 2  # <|im_end|> in the tiny tokenizer
    decoded = await client.post(api.TEXT_DECODE_PATH, json={"sequences": [ids[0] + [eos], ids[1]], "pieces": True})
    assert decoded.status_code == 200, decoded.text
    first, second = api.DecodedTexts.model_validate(decoded.json()).sequences
    assert first.text == "hello world" and second.text == "abc"  # special tokens skipped in the text
    assert first.special == [False] * len(ids[0]) + [True]
    assert "".join(first.pieces or []) == "hello world<|im_end|>"


@pytest.mark.parametrize(("path", "body", "status"), [
    (api.TEXT_DECODE_PATH, {"sequences": [[10**6]]}, 400),
    (api.TEXT_DECODE_PATH, {"sequences": [[-1]]}, 400),
    (api.TEXT_DECODE_PATH, {"sequences": []}, 400),
    (api.TEXT_ENCODE_PATH, {"texts": []}, 400),
    (api.TEXT_CHAT_PATH, {"chats": []}, 400),
    (api.TEXT_CHAT_PATH, {"chats": [{"messages": []}]}, 400),
    (api.TEXT_CHAT_PATH, {"chats": [{"messages": [{"role": "", "content": "x"}]}]}, 400),
])
async def test_bad_input_is_a_json_4xx(tokenizer: object, path: str, body: dict[str, object], status: int) -> None:
    app = FastAPI()
    _install_error_handlers(app, SimpleNamespace(metrics=TrainerMetrics()))  # type: ignore[arg-type]
    add_text_routes(app, lambda: TextModel(tokenizer, None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://trainer") as http:
        response = await http.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["category"] == "user"


async def test_a_tokenizer_without_a_chat_template_is_each_chats_error_and_no_model_yet_a_503() -> None:
    class Plain:
        chat_template = None

    for model, status in ((TextModel(Plain()), 200), (None, 503)):
        app = FastAPI()
        add_text_routes(app, lambda m=model: m)  # type: ignore[misc]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://trainer") as http:
            response = await http.post(api.TEXT_CHAT_PATH, json={"chats": [{"messages": MESSAGES}]})
        assert response.status_code == status, response.text
        if status == 200:
            assert "no chat template" in response.json()["chats"][0]["error"]


def test_text_model_of_reads_the_engines_tokenizer_and_context_length(tokenizer: object) -> None:
    class Config:
        max_position_embeddings = 4096

    class Model:
        config = Config()

    class Engine:
        pass

    engine = Engine()
    assert text_model_of(engine) is None  # not loaded yet
    engine.tokenizer, engine.model = tokenizer, Model()  # type: ignore[attr-defined]
    assert text_model_of(engine) == TextModel(tokenizer, 4096)

