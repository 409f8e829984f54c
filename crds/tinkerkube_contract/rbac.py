"""The Kubernetes API permissions each component needs: exactly what its code calls, nothing more.

The Helm chart's Roles/ClusterRoles render these rules (charts/tinkerkube/templates/rbac/), and
tests/chart/test_rbac.py keeps three things equal: these declarations, the rendered RBAC, and the calls
found in the code (the `kubernetes` client methods the component uses, plus what kopf does for the
handlers it registers). Add a call → add its rule here → the chart test tells you to render it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from tinkerkube_contract.resource import GROUP, PLURAL, POOL_PLURAL

CORE = ""
KOPF_GROUP = "kopf.dev"
CRD_GROUP = "apiextensions.k8s.io"


class Scope(StrEnum):
    NAMESPACE = "namespace"  # a Role in the namespace the sessions live in
    CLUSTER = "cluster"  # a ClusterRole (read-only discovery only)


@dataclass(frozen=True, slots=True)
class Rule:
    api_group: str
    resource: str
    verbs: frozenset[str]
    scope: Scope = Scope.NAMESPACE
    why: str = ""


def _rule(group: str, resource: str, verbs: str, why: str, scope: Scope = Scope.NAMESPACE) -> Rule:
    return Rule(group, resource, frozenset(verbs.split()), scope, why)


SESSIONS = PLURAL
SESSIONS_STATUS = f"{PLURAL}/status"
POOLS = POOL_PLURAL
POOLS_STATUS = f"{POOL_PLURAL}/status"

OPERATOR_RULES: tuple[Rule, ...] = (
    _rule(GROUP, SESSIONS, "get list watch patch",
          "kopf watches sessions and patches finalizers/annotations; kube.py reads one, lists them (pool binding)"),
    _rule(GROUP, SESSIONS_STATUS, "patch", "kube.py writes conditions, phase, endpoint, pool"),
    _rule(GROUP, POOLS, "create delete get list watch patch",
          "kopf watches pools; kube.py creates pools (binding, warm pools), claims warm ones (patch spec.owner), "
          "deletes idle ones"),
    _rule(GROUP, POOLS_STATUS, "patch", "kube.py writes a pool's conditions, phase, endpoint, runs"),
    _rule(CORE, "pods", "create delete list watch", "kube.py creates/lists/deletes trainer pods; kopf indexes them"),
    _rule(CORE, "services", "create delete", "kube.py creates/deletes the headless Service"),
    _rule(CORE, "events", "create", "kopf posts Events on sessions"),
)
OPERATOR_PEERING_RULES: tuple[Rule, ...] = (
    _rule(KOPF_GROUP, "kopfpeerings", "list watch patch", "kopf peering between operator replicas"),
)
OPERATOR_CLUSTER_RULES: tuple[Rule, ...] = (
    _rule(CRD_GROUP, "customresourcedefinitions", "list watch", "kopf's resource discovery", Scope.CLUSTER),
    _rule(CORE, "namespaces", "list watch", "kopf's namespace observation", Scope.CLUSTER),
)
GATEWAY_RULES: tuple[Rule, ...] = (
    _rule(GROUP, SESSIONS, "create delete get", "one TrainingSession per training run / sampler; polls its status"),
    _rule(GROUP, SESSIONS_STATUS, "patch", "mirrors futures aggregates and lastCheckpoint into status"),
)
