"""Loads in threads must not break transformers' weight tying for the rest of the process (hf_loading)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from transformers import PreTrainedModel

from tinkerkube_trainer.hf_loading import untied_problem
from tinkerkube_trainer.model_loading import load_base_model


def test_concurrent_loads_leave_transformers_tying_intact(tiny_model_dir: Path, model_cache_dir: Path) -> None:
    """transformers swaps `tie_weights`/`init_weights` on the class during a load; racing loads used to
    leave them no-ops, and a later SmolLM2 load kept an untied, meaningless lm_head."""
    tie, init = PreTrainedModel.tie_weights, PreTrainedModel.init_weights
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda _: load_base_model(str(tiny_model_dir), cache_dir=model_cache_dir,
                                                         device="cpu"), range(16)))
    assert len(loaded) == 16
    assert PreTrainedModel.tie_weights is tie and PreTrainedModel.init_weights is init


def test_an_untied_lm_head_is_named(tiny_model_dir: Path, model_cache_dir: Path) -> None:
    model = load_base_model(str(tiny_model_dir), cache_dir=model_cache_dir, device="cpu").model
    assert untied_problem(model) == ""  # the tiny model does not tie: nothing to check
    model.config.tie_word_embeddings = True
    assert "separate tensor" in untied_problem(model)
    model.lm_head.weight = model.get_input_embeddings().weight
    assert untied_problem(model) == ""

