"""docs/endpoints.md lists every endpoint family of the installed `tinker` SDK with its status here, and the
statuses are true of the gateway app.

The families are derived from the SDK's own source (every call that names an `/api/...` path: the
generated `tinker/resources/*.py` methods plus the hand-written clients under `tinker/lib` and `tinker/cli`),
so a new SDK version that adds one fails this test until the table says what happens to it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tinker

from tinkerkube_gateway.app import create_app

DOC = Path(__file__).resolve().parents[2] / "docs" / "endpoints.md"
ROW = re.compile(r"^\|\s*(GET|POST|PUT|DELETE|PATCH)\s*\|\s*`([^`]+)`\s*\|\s*([a-z ]+?)\s*\|")
STATUSES = {"served", "partial", "not served"}
Family = tuple[str, str]  # (method, path with every {parameter} written as {})


def family(method: str, path: str) -> Family:
    return method.upper(), re.sub(r"\{[^}]*\}", "{}", path)


def _text(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)  # type: ignore[misc]
    return None


def sdk_families() -> dict[Family, list[str]]:
    """Family → where the SDK calls it. `client.get(path)` / `self._post(path)` / `_request("GET", path)`."""
    root = Path(tinker.__file__).parent
    found: dict[Family, list[str]] = {}
    for source in sorted(root.rglob("*.py")):
        if source.name.endswith("_test.py") or "tests" in source.parts:
            continue
        for node in ast.walk(ast.parse(source.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute) or not node.args:
                continue
            verb = node.func.attr.lstrip("_")
            if verb == "request" and len(node.args) >= 2:
                method, path = _text(node.args[0]), _text(node.args[1])
            elif verb in ("get", "post", "put", "delete", "patch"):
                method, path = verb, _text(node.args[0])
            else:
                continue
            if method and path and path.startswith("/api/"):
                found.setdefault(family(method, path), []).append(str(source.relative_to(root)))
    return found


def doc_rows() -> dict[Family, str]:
    rows: dict[Family, str] = {}
    for line in DOC.read_text().splitlines():
        match = ROW.match(line)
        if match:
            key = family(match[1], match[2])
            assert key not in rows, f"{key} is listed twice in {DOC.name}"
            rows[key] = match[3]
    return rows


def gateway_routes() -> set[Family]:
    app = create_app(lambda: None)  # type: ignore[arg-type,return-value]  # routes only; never started
    return {family(method, re.sub(r":[a-z]+\}", "}", path))
            for path, ops in app.openapi()["paths"].items() for method in ops}


def test_the_sdk_derivation_finds_the_families_it_must() -> None:
    found = sdk_families()
    for known in (("POST", "/api/v1/asample"), ("POST", "/api/v1/forward_backward"),
                  ("GET", "/api/v1/training_runs/{}/checkpoints"), ("PUT", "/api/v1/sessions/{}/project")):
        assert known in found
    assert len(found) >= 40


def test_every_sdk_endpoint_family_is_in_the_table_and_nothing_else() -> None:
    sdk, rows = sdk_families(), doc_rows()
    sdk_rows = {k: v for k, v in rows.items() if k[1].startswith("/api/")}
    missing = sorted(set(sdk) - set(sdk_rows))
    assert not missing, f"{DOC.name} misses SDK endpoint families (found in {[sdk[m] for m in missing]}): {missing}"
    assert not sorted(set(sdk_rows) - set(sdk)), "the table lists families the installed SDK does not call"
    assert set(rows.values()) <= STATUSES


def test_statuses_are_true_of_the_gateway_app() -> None:
    routes, rows = gateway_routes(), doc_rows()
    claimed = sorted(k for k, status in rows.items() if status != "not served" and k not in routes)
    assert not claimed, f"marked served/partial in {DOC.name} but the gateway has no route: {claimed}"
    unclaimed = sorted(k for k, status in rows.items() if status == "not served" and k in routes)
    assert not unclaimed, f"the gateway now routes these; update their status in {DOC.name}: {unclaimed}"


def test_the_compatible_apis_are_listed_and_routed() -> None:
    routes, rows = gateway_routes(), doc_rows()
    compat = {k for k in routes if k[1].startswith(("/oai/", "/anthropic/"))}
    assert compat and compat <= set(rows), f"list every OpenAI/Anthropic-compatible route: {sorted(compat - set(rows))}"
