"""One process-wide lock around every transformers model construction, and a load that checks ties held.

Why: transformers 5.5's `from_pretrained` and `from_config` switch weight tying and init off by
replacing `PreTrainedModel.tie_weights` / `init_weights` on the class for the duration of the load, then
put back what they found. Two loads in two threads interleave those save/restore pairs and can leave
`tie_weights` a no-op for the rest of the process: every later model with tied embeddings (SmolLM2)
keeps its lm_head on the meta device or randomly initialised, and plain English costs ~11 nats/token.
Rank stand-ins and racing builds do load in threads, so every load here goes through `serialized()`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_LOAD_LOCK = threading.RLock()


@contextmanager
def serialized() -> Iterator[None]:
    """Hold while constructing or loading a transformers model."""
    with _LOAD_LOCK:
        yield


class UntiedModel(RuntimeError):
    """A model whose config ties lm_head to the input embeddings came out with them separate."""


def load_causal_lm(location: str | Path, **kwargs: Any) -> Any:
    """`AutoModelForCausalLM.from_pretrained` under the lock (`AutoModelForImageTextToText` for a
    vision-language model: its config has a `vision_config`); raises UntiedModel rather than hand back a
    model whose tied lm_head is missing (it would score every token as noise)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    with serialized():
        config = AutoConfig.from_pretrained(location, local_files_only=kwargs.get("local_files_only", False))
        auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
        model = auto.from_pretrained(location, **kwargs)
    problem = untied_problem(model)
    if problem:
        raise UntiedModel(f"loading {location}: {problem}")
    return model


def untied_problem(model: Any) -> str:
    """'' when a model whose config ties input and output embeddings really shares the tensor."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return ""
    output = model.get_output_embeddings()
    if output is None:
        return ""
    if output.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr() or output.weight.is_meta:
        return ("the model's config ties lm_head to the input embeddings but the loaded lm_head is a separate "
                f"tensor on {output.weight.device} (transformers did not tie it)")
    return ""
