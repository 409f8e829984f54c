"""The chart README's values table, generated from values.yaml's `# --` comments (what helm-docs does).

    python tests/chart/values_table.py --write   # rewrite the table in charts/tinkerkube/README.md

tests/chart/test_readme.py fails when the README's table differs from this output.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "tinkerkube"
BEGIN, END = "<!-- values-table:begin -->", "<!-- values-table:end -->"


def _lookup(values: dict[str, Any], path: str) -> Any:
    node: Any = values
    for key in path.split("."):
        node = node[key]
    return node


def rows() -> list[tuple[str, str, str]]:
    lines = (CHART / "values.yaml").read_text().splitlines()
    values = yaml.safe_load("\n".join(lines))
    stack: list[tuple[int, str]] = []
    out, skip = [], None
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):(.*)$", line)
        if not m:
            continue
        indent = len(m[1])
        if skip is not None and indent > skip:
            continue
        skip = None
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([name for _, name in stack] + [m[2]])
        comment = lines[i - 1].strip()
        if comment.startswith("# --"):
            skip = indent
            default = json.dumps(_lookup(values, path))
            out.append((path, default if len(default) <= 60 else "see values.yaml", comment[4:].strip()))
        else:
            stack.append((indent, m[2]))
    return out


def table() -> str:
    body = [f"| `{p}` | `{d}` | {c.replace('|', chr(92) + '|')} |" for p, d, c in rows()]
    return "\n".join([BEGIN, "| key | default | description |", "|---|---|---|", *body, END])


def write() -> None:
    readme = CHART / "README.md"
    text = readme.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    readme.write_text(text[:start] + table() + text[end:])


if __name__ == "__main__":
    if "--write" in sys.argv:
        write()
    else:
        print(table())
