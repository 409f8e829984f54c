"""Rebuild a GGUF's GPT-2-style byte-level BPE tokenizer as a Hugging Face fast tokenizer.

Why not `AutoTokenizer.from_pretrained(..., gguf_file=...)`: transformers 5.5 converts SmolLM2's
`gpt2` vocabulary as a sentencepiece-style (CodeLlama) tokenizer, which maps every space to token 0
(`<|endoftext|>`): training data and samples become garbage while everything still "runs". The GGUF
holds the real vocabulary, merges, special-token ids and chat template, so we rebuild from those.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_SPECIAL_TYPES = {2, 3, 4}


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    values = [field.parts[i] for i in field.data]
    if field.types[-1].name == "STRING":
        decoded = [bytes(v).decode("utf-8") for v in values]
    else:
        decoded = [v.tolist()[0] if hasattr(v, "tolist") else v for v in values]
    return decoded if field.types[0].name == "ARRAY" else decoded[0]


def _pre_tokenizer(pre: str | None) -> Any:
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # llama.cpp's `smollm` pre-tokenizer (StarCoder lineage) splits digits one by one first.
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def tokenizer_from_gguf(path: Path) -> Any:
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(path))
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path.name}: only gpt2 (byte-level BPE) GGUF tokenizers are supported, not {kind!r}")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    types: list[int] = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()

    def special(key: str) -> str | None:
        idx = _field(reader, key)
        return tokens[idx] if isinstance(idx, int) and 0 <= idx < len(tokens) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special("tokenizer.ggml.bos_token_id"),
        eos_token=special("tokenizer.ggml.eos_token_id"),
        unk_token=special("tokenizer.ggml.unknown_token_id"),
        pad_token=special("tokenizer.ggml.padding_token_id"),
        additional_special_tokens=[t for t, kind_ in zip(tokens, types, strict=True) if kind_ in _SPECIAL_TYPES],
        chat_template=_field(reader, "tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
