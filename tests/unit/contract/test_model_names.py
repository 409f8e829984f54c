"""Tinker's variant model names (`org/model:peft:<context length>`) name their base model."""

from __future__ import annotations

from pathlib import Path

from tinkerkube_contract.models import TINY_QWEN3, SourceKind, base_model_name, builtin_dir, resolve_model


def test_a_variant_suffix_names_the_base_model(tmp_path: Path) -> None:
    assert base_model_name("Qwen/Qwen3-8B:peft:262144") == "Qwen/Qwen3-8B"
    assert base_model_name("zai-org/GLM-5.3:peft") == "zai-org/GLM-5.3"
    assert base_model_name("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    assert base_model_name("my:alias:1", {"my:alias:1": "x"}) == "my:alias:1"  # an alias is a whole name
    odd = tmp_path / "dir:with:colons"
    odd.mkdir()
    assert base_model_name(str(odd)) == str(odd)  # so is an existing directory
    assert base_model_name(":peft:1") == ":peft:1"  # nothing before the suffix: left alone
    source = resolve_model(f"{TINY_QWEN3}:peft:32768", cache_dir=tmp_path)
    assert source.kind is SourceKind.BUILTIN and source.local_dir == builtin_dir(tmp_path, TINY_QWEN3)
