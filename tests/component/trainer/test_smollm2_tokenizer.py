"""The SmolLM2 built-in must tokenise like the real model: a broken tokenizer still 'trains' on garbage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

TEXT = "The capital of France is Paris. 12 + 30 = 42\n\nUser: thanks"


@pytest.fixture(scope="module")
def smollm2_dir(model_cache_dir: Path) -> Path:
    from tinkerkube_contract.models import SMOLLM2_135M
    from tinkerkube_trainer.model_store import prepare

    return prepare(SMOLLM2_135M, model_cache_dir)


def test_text_round_trips_and_spaces_are_not_unknown(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert tok.decode(ids) == TEXT
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(tok.encode(" capital", add_special_tokens=False)) == ["Ġcapital"]
    assert tok.eos_token == "<|im_end|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


def test_the_model_finds_plain_english_likely(smollm2_dir: Path) -> None:
    """A coherent 135M model gives ordinary English a few nats per token; misaligned ids give ~20."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ids = torch.tensor([tok.encode("The capital of France is Paris. It is a large city in Europe.")])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 5.0, f"mean NLL {loss:.2f} nats/token: the tokenizer does not match the weights"
