"""The chart README documents every value: its table is generated from values.yaml and must not drift."""

from __future__ import annotations

from tests.chart.conftest import CHART
from tests.chart.values_table import BEGIN, END, rows, table


def test_readme_values_table_matches_values_yaml() -> None:
    text = (CHART / "README.md").read_text()
    current = text[text.index(BEGIN): text.index(END) + len(END)]
    assert current == table(), "values.yaml changed: run `python tests/chart/values_table.py --write`"


def test_every_component_has_the_standard_keys() -> None:
    documented = {path for path, _, _ in rows()}
    for component in ("gateway", "operator", "trainer"):
        for key in ("image.registry", "image.repository", "image.tag", "image.pullPolicy", "nodeSelector",
                    "tolerations"):
            assert f"{component}.{key}" in documented, f"{component}.{key}"
    for component in ("gateway", "operator"):
        for key in ("replicas", "resources", "podAnnotations", "extraEnv"):
            assert f"{component}.{key}" in documented, f"{component}.{key}"
