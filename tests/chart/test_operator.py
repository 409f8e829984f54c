"""Operator templates and the trainer defaults it (and the gateway) pass to trainer pods."""

from __future__ import annotations

import json

from tests.chart.conftest import Helm


def test_one_operator_runs_standalone_and_is_replaced_not_rolled(helm: Helm) -> None:
    render = helm.render("default")
    deploy = render.find("Deployment", "-operator")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    assert render.env("operator")["TINKERKUBE_OPERATOR_STANDALONE"] == "true"
    assert not render.all("KopfPeering")


def test_several_operators_need_peering(helm: Helm) -> None:
    proc = helm.template("--set", "operator.replicas=2", check=False)
    assert proc.returncode != 0 and "operator.peering.enabled=true" in proc.stderr


def test_peering_elects_one_leader_among_replicas(helm: Helm) -> None:
    render = helm.render("values-ha-postgres")
    env = render.env("operator")
    assert env["TINKERKUBE_OPERATOR_STANDALONE"] == "false"
    assert env["TINKERKUBE_OPERATOR_PEERING_NAME"] == "tinkerkube"
    assert render.find("KopfPeering", "tinkerkube")["metadata"]["namespace"] == "tinkerkube"
    assert render.find("Deployment", "-operator")["spec"]["replicas"] == 2


def test_operator_watches_only_the_release_namespace(helm: Helm) -> None:
    env = helm.render("default").env("operator")
    assert json.loads(env["TINKERKUBE_OPERATOR_NAMESPACES"]) == ["tinkerkube"]


def test_cluster_domain_reaches_the_operator(helm: Helm) -> None:
    assert helm.render("default").env("operator")["TINKERKUBE_OPERATOR_CLUSTER_DOMAIN"] == "cluster.local"
    custom = helm.render("domain", "--set", "operator.clusterDomain=corp.internal").env("operator")
    assert custom["TINKERKUBE_OPERATOR_CLUSTER_DOMAIN"] == "corp.internal"


def test_operator_runs_its_entry_point_and_exposes_metrics(helm: Helm) -> None:
    render = helm.render("default")
    container = render.container("operator")
    assert container["command"] == ["python", "-m", "tinkerkube_operator.main"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    assert render.env("operator")["TINKERKUBE_OPERATOR_METRICS_PORT"] == "9090"
    assert render.find("Service", "-operator-metrics")["spec"]["ports"][0]["targetPort"] == "metrics"


def test_trainer_image_and_checkpoint_pvc_are_passed_to_the_operator(helm: Helm) -> None:
    render = helm.render("default")
    env = render.env("operator")
    assert env["TINKERKUBE_OPERATOR_TRAINER_IMAGE"] == "ghcr.io/tinkerkube/trainer:0.1.0"
    pvc = render.find("PersistentVolumeClaim", "-checkpoints")
    assert env["TINKERKUBE_OPERATOR_CHECKPOINT_PVC"] == pvc["metadata"]["name"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert env["TINKERKUBE_OPERATOR_SERVICE_ACCOUNT"] == render.find("ServiceAccount", "-trainer")["metadata"]["name"]


def test_gpu_values_reach_the_trainer_pod_defaults(helm: Helm) -> None:
    env = helm.render("values-gpu").env("gateway")
    assert env["TINKERKUBE_GATEWAY_TRAINER_GPUS"] == "4"
    assert env["TINKERKUBE_GATEWAY_TRAINER_NPROC_PER_NODE"] == "4"
    assert json.loads(env["TINKERKUBE_GATEWAY_TRAINER_NODE_SELECTOR"]) == {"nvidia.com/gpu.present": "true"}
    assert json.loads(env["TINKERKUBE_GATEWAY_TRAINER_TOLERATIONS"]) == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert env["TINKERKUBE_GATEWAY_TRAINER_PRIORITY_CLASS_NAME"] == "training"


def test_an_existing_checkpoint_claim_is_used_and_not_created(helm: Helm) -> None:
    render = helm.render("ckpt-claim", "--set", "trainer.checkpoints.pvc.existingClaim=shared-ckpts")
    assert not render.all("PersistentVolumeClaim", "-checkpoints")
    assert render.env("operator")["TINKERKUBE_OPERATOR_CHECKPOINT_PVC"] == "shared-ckpts"
