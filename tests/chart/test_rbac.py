"""RBAC is exactly what the code calls: the rendered Roles/ClusterRoles equal tinkerkube_contract.rbac, and
those declarations equal the calls found in the components' source (kubernetes client methods + kopf)."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

from tests.chart.conftest import ROOT, Helm, Render
from tinkerkube_contract import rbac
from tinkerkube_contract.resource import PLURAL, POOL_PLURAL

Perms = dict[tuple[str, str], frozenset[str]]
OPERATOR_PKG = ROOT / "operator" / "tinkerkube_operator"
GATEWAY_PKG = ROOT / "api_gateway" / "tinkerkube_gateway"
# kubernetes client method → verb. `read_*` is a GET; `*_status` targets the status subresource.
_CLIENT_CALL = re.compile(
    r"^(?P<verb>create|delete|list|patch|replace|read|get)_namespaced_(?P<kind>[a-z_]+?)(?P<status>_status)?$")
_VERB = {"read": "get", "replace": "update"}
_KIND = {"custom_object": PLURAL, "pod": "pods", "service": "services", "event": "events",
         "persistent_volume_claim": "persistentvolumeclaims", "config_map": "configmaps", "secret": "secrets"}
_KOPF_SESSION_DECORATORS = {"create", "update", "resume", "delete", "field", "timer", "daemon"}


def _perms(rules: tuple[rbac.Rule, ...] | list[rbac.Rule]) -> Perms:
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for rule in rules:
        out[(rule.api_group, rule.resource)] |= set(rule.verbs)
    return {k: frozenset(v) for k, v in out.items()}


def _rendered(render: Render, kind: str, component: str) -> Perms:
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for doc in render.all(kind, f"-{component}"):
        for rule in doc["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    out[(group, resource)] |= set(rule["verbs"])
    return {k: frozenset(v) for k, v in out.items()}


def client_calls(package: Path) -> Perms:
    """Every `kubernetes` client method the package names (called or passed along), as RBAC permissions.
    A module that also uses `Watch().stream(list_...)` needs `watch` on what it lists."""
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        watches = any(isinstance(n, ast.Attribute) and n.attr == "stream" for n in ast.walk(tree))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not (m := _CLIENT_CALL.match(node.attr)):
                continue
            for resource in _resources(m["kind"], parents.get(node)):
                group = "tinkerkube.dev" if resource in (PLURAL, POOL_PLURAL) else rbac.CORE
                key = (group, resource + ("/status" if m["status"] else ""))
                out[key].add(_VERB.get(m["verb"], m["verb"]))
                if watches and m["verb"] == "list":
                    out[key].add("watch")
    return {k: frozenset(v) for k, v in out.items()}


def _resources(kind: str, parent: ast.AST | None) -> tuple[str, ...]:
    """A custom-object call names its plural: `POOL_PLURAL` (pools), a `plural` parameter (a helper used for
    both kinds), else the sessions' `PLURAL`."""
    if kind != "custom_object":
        return (_KIND.get(kind, kind + "s"),)
    names = {a.id for a in getattr(parent, "args", []) if isinstance(a, ast.Name)}
    if "POOL_PLURAL" in names:
        return (POOL_PLURAL,)
    return (PLURAL, POOL_PLURAL) if "plural" in names else (PLURAL,)


def kopf_calls(package: Path) -> Perms:
    """What kopf does for the handlers the package registers: watching sessions means list+watch, and
    handlers with finalizers/progress patch them; `index`/`on.event` on a core kind means list+watch;
    posting Events means create events."""
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            dotted = ast.unparse(node.func)
            if not dotted.startswith("kopf."):
                continue
            core_kind = next((a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)),
                             None)
            spread = {k.value.id for k in node.keywords if k.arg is None and isinstance(k.value, ast.Name)}
            if core_kind in ("pods", "services"):
                out[(rbac.CORE, core_kind)] |= {"list", "watch"}
            elif dotted.rsplit(".", 1)[-1] in _KOPF_SESSION_DECORATORS | {"event", "index"}:
                resource = POOL_PLURAL if "POOLS" in spread else PLURAL
                out[("tinkerkube.dev", resource)] |= {"list", "watch", "patch"}
    if out:
        out[(rbac.CORE, "events")].add("create")
    return {k: frozenset(v) for k, v in out.items()}


def _merge(*perms: Perms) -> Perms:
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for p in perms:
        for k, v in p.items():
            out[k] |= v
    return {k: frozenset(v) for k, v in out.items()}


def test_operator_role_renders_exactly_the_declared_rules(helm: Helm) -> None:
    assert _rendered(helm.render("default"), "Role", "operator") == _perms(rbac.OPERATOR_RULES)


def test_operator_with_peering_adds_only_the_peering_rules(helm: Helm) -> None:
    rendered = _rendered(helm.render("values-ha-postgres"), "Role", "operator")
    assert rendered == _perms(rbac.OPERATOR_RULES + rbac.OPERATOR_PEERING_RULES)


def test_operator_cluster_role_is_read_only_discovery(helm: Helm) -> None:
    rendered = _rendered(helm.render("default"), "ClusterRole", "operator")
    assert rendered == _perms(rbac.OPERATOR_CLUSTER_RULES)
    assert all(verbs <= {"get", "list", "watch"} for verbs in rendered.values())


def test_gateway_role_renders_exactly_the_declared_rules(helm: Helm) -> None:
    render = helm.render("default")
    assert _rendered(render, "Role", "gateway") == _perms(rbac.GATEWAY_RULES)
    assert not render.all("ClusterRole", "-gateway"), "the gateway needs no cluster-wide permission"


def test_bindings_point_at_the_component_service_accounts(helm: Helm) -> None:
    render = helm.render("default")
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        for binding in render.all(kind):
            component = binding["metadata"]["labels"]["app.kubernetes.io/component"]
            (subject,) = binding["subjects"]
            assert subject["name"] == f"tk-tinkerkube-{component}" and subject["namespace"] == "tinkerkube"


def test_rbac_create_false_renders_no_rbac(helm: Helm) -> None:
    kinds = {d["kind"] for d in helm.render("no-rbac", "--set", "rbac.create=false").docs}
    assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}


def test_operator_declarations_equal_what_its_code_calls() -> None:
    if not (OPERATOR_PKG / "kube.py").exists():
        pytest.skip("operator/tinkerkube_operator/kube.py not written yet")
    found = _merge(client_calls(OPERATOR_PKG), kopf_calls(OPERATOR_PKG))
    assert found == _perms(rbac.OPERATOR_RULES), (
        f"code calls {sorted((k, sorted(v)) for k, v in found.items())}; update tinkerkube_contract/rbac.py "
        "and charts/tinkerkube/templates/rbac/operator.yaml together"
    )


def test_gateway_declarations_equal_what_its_code_calls() -> None:
    found = client_calls(GATEWAY_PKG)
    if not found:
        pytest.skip("the gateway's Kubernetes backend makes no kubernetes client call yet")
    assert found == _perms(rbac.GATEWAY_RULES), (
        f"code calls {sorted((k, sorted(v)) for k, v in found.items())}; update tinkerkube_contract/rbac.py "
        "and charts/tinkerkube/templates/rbac/gateway.yaml together"
    )


def test_trainer_pods_get_no_api_access(helm: Helm) -> None:
    render = helm.render("default")
    sa = render.find("ServiceAccount", "-trainer")
    assert sa["automountServiceAccountToken"] is False
    bound = {s["name"] for b in render.all("RoleBinding") + render.all("ClusterRoleBinding") for s in b["subjects"]}
    assert sa["metadata"]["name"] not in bound
