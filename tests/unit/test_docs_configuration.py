"""docs/configuration.md is generated from the settings classes; a stale copy fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_configuration", DOCS / "gen_configuration.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_doc_matches_the_settings_classes() -> None:
    expected = _generator().render()
    actual = (DOCS / "configuration.md").read_text()
    assert actual == expected, "docs/configuration.md is stale: run `python docs/gen_configuration.py`"


def test_every_component_section_lists_its_variables() -> None:
    text = _generator().render()
    for prefix in ("TINKERKUBE_GATEWAY_PORT", "TINKERKUBE_OPERATOR_", "TINKERKUBE_TRAINER_MODEL_ID"):
        assert prefix in text
