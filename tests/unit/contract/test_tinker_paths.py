"""tinker:// parsing is the one guard against path tricks for every component."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinkerkube_contract.paths import (
    CheckpointKind,
    InvalidTinkerPath,
    model_id_for,
    parse_checkpoint_id,
    parse_tinker_path,
    sampler_id_for,
)


def test_observed_sdk_path_round_trips() -> None:
    path = parse_tinker_path("tinker://sess-x:train:0/weights/step1")
    assert (path.run_id, path.kind, path.name) == ("sess-x:train:0", CheckpointKind.WEIGHTS, "step1")
    assert str(path) == "tinker://sess-x:train:0/weights/step1"
    assert path.checkpoint_id == "weights/step1"


def test_directory_stays_under_the_store_root(tmp_path: Path) -> None:
    path = parse_tinker_path("tinker://sess-a:train:3/sampler_weights/final")
    assert path.directory(tmp_path) == tmp_path / "sess-a:train:3" / "sampler_weights" / "final"


@pytest.mark.parametrize(
    "bad",
    [
        "tinker://sess/weights/../../etc",
        "tinker://sess/weights/..",
        "tinker://../weights/x",
        "tinker://sess/weights/a/b",
        "tinker://sess/weights/",
        "tinker://sess/checkpoints/x",
        "tinker://sess/weights/.hidden",
        "tinker://sess/weights/x\x00y",
        "file:///etc/passwd",
        "tinker://sess/weights/-rf",
    ],
)
def test_path_tricks_are_rejected_with_a_reason(bad: str) -> None:
    with pytest.raises(InvalidTinkerPath) as err:
        parse_tinker_path(bad)
    assert str(err.value)


def test_rest_checkpoint_ids_follow_the_same_rules() -> None:
    assert parse_checkpoint_id("s:train:0", "weights/x").name == "x"
    with pytest.raises(InvalidTinkerPath):
        parse_checkpoint_id("s:train:0", "weights/../../x")


def test_model_and_sampler_ids_use_the_sdk_format() -> None:
    assert model_id_for("sess-1", 2) == "sess-1:train:2"
    assert sampler_id_for("sess-1", 0) == "sess-1:sample:0"
