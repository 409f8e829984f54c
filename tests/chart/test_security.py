"""Security: non-root read-only pods, the gateway↔trainer token, and the NetworkPolicy around trainer pods."""

from __future__ import annotations

import base64

import pytest

from tests.chart.conftest import Helm
from tinkerkube_contract.pod_api import HEADER_TOKEN
from tinkerkube_contract.resource import LABEL_ROLE, RENDEZVOUS_PORT, TRAINER_PORT


@pytest.mark.parametrize("component", ["gateway", "operator"])
def test_pods_run_as_non_root_with_a_read_only_root_filesystem(helm: Helm, component: str) -> None:
    render = helm.render("default")
    pod = render.find("Deployment", f"-{component}")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "a writable /tmp for caches and temp files"


def test_the_trainer_token_is_generated_and_shared_by_gateway_and_operator(helm: Helm) -> None:
    render = helm.render("default")
    secret = render.find("Secret", "-trainer-token")
    token = base64.b64decode(secret["data"]["token"])
    assert len(token) >= 32
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    ref = render.env("gateway")["TINKERKUBE_GATEWAY_TRAINER_AUTH_TOKEN"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "token"}
    assert render.env("operator")["TINKERKUBE_OPERATOR_AUTH_TOKEN_SECRET"] == secret["metadata"]["name"]
    assert HEADER_TOKEN == "X-Tinkerkube-Token"


def test_an_existing_token_secret_is_used_and_not_generated(helm: Helm) -> None:
    render = helm.render("token", "--set", "trainer.authToken.existingSecret=my-token",
                         "--set", "trainer.authToken.secretKey=t")
    assert not render.all("Secret", "-trainer-token")
    assert render.env("gateway")["TINKERKUBE_GATEWAY_TRAINER_AUTH_TOKEN"]["secretKeyRef"] == {"name": "my-token",
                                                                                             "key": "t"}
    assert render.env("operator")["TINKERKUBE_OPERATOR_AUTH_TOKEN_SECRET_KEY"] == "t"


def test_only_the_gateway_and_other_trainers_reach_trainer_pods(helm: Helm) -> None:
    render = helm.render("default")
    policy = render.find("NetworkPolicy", "-trainer")["spec"]
    assert policy["podSelector"] == {"matchLabels": {LABEL_ROLE: "trainer"}}
    assert policy["policyTypes"] == ["Ingress"]
    gateway_rule, trainer_rule = policy["ingress"]
    gateway_labels = render.find("Deployment", "-gateway")["spec"]["selector"]["matchLabels"]
    assert gateway_rule["from"] == [{"podSelector": {"matchLabels": gateway_labels}}]
    assert gateway_rule["ports"] == [{"protocol": "TCP", "port": TRAINER_PORT}]
    # torch.distributed: rendezvous on RENDEZVOUS_PORT, then gloo/nccl on ephemeral ports between ranks.
    assert trainer_rule == {"from": [{"podSelector": {"matchLabels": {LABEL_ROLE: "trainer"}}}]}
    assert RENDEZVOUS_PORT != TRAINER_PORT


def test_prometheus_may_scrape_trainers_when_told_where_it_runs(helm: Helm) -> None:
    policy = helm.render("values-monitoring").find("NetworkPolicy", "-trainer")["spec"]
    prometheus = policy["ingress"][2]
    assert prometheus["from"][0]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    assert prometheus["ports"] == [{"protocol": "TCP", "port": TRAINER_PORT}]


def test_network_policy_can_be_turned_off(helm: Helm) -> None:
    assert not helm.render("no-np", "--set", "networkPolicy.enabled=false").all("NetworkPolicy")


def test_monitors_scrape_each_component_on_its_metrics_port(helm: Helm) -> None:
    render = helm.render("values-monitoring")
    gateway = render.find("ServiceMonitor", "-gateway")
    assert gateway["spec"]["endpoints"][0]["port"] == "http"
    assert gateway["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert render.find("ServiceMonitor", "-operator")["spec"]["endpoints"][0]["port"] == "metrics"
    trainer = render.find("PodMonitor", "-trainer")
    assert trainer["spec"]["selector"] == {"matchLabels": {LABEL_ROLE: "trainer"}}
    assert trainer["spec"]["podMetricsEndpoints"][0] == {"port": "trainer", "path": "/metrics", "interval": "15s"}
    assert not helm.render("default").all("ServiceMonitor")
