"""Gateway templates: storage (SQLite PVC for one replica, PostgreSQL from a Secret for several), API keys,
Service, Ingress, PodDisruptionBudget. One case per value."""

from __future__ import annotations

import json

from tests.chart.conftest import Helm


def test_one_replica_keeps_sqlite_on_a_pvc_and_never_runs_two_writers(helm: Helm) -> None:
    render = helm.render("default")
    deploy = render.find("Deployment", "-gateway")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    pvc = render.find("PersistentVolumeClaim", "-gateway-data")
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert "TINKERKUBE_GATEWAY_DATABASE_URL" not in render.env("gateway")  # SQLite under STATE_DIR
    assert render.env("gateway")["TINKERKUBE_GATEWAY_STATE_DIR"] == "/var/lib/tinkerkube"
    assert not render.all("PodDisruptionBudget")


def test_several_replicas_without_postgres_fail_with_a_clear_message(helm: Helm) -> None:
    proc = helm.template("--set", "gateway.replicas=2", check=False)
    assert proc.returncode != 0
    assert "gateway.replicas=2 needs PostgreSQL" in proc.stderr and "database.postgres.enabled=true" in proc.stderr


def test_postgres_enabled_without_a_url_fails_with_a_clear_message(helm: Helm) -> None:
    proc = helm.template("--set", "database.postgres.enabled=true", check=False)
    assert proc.returncode != 0 and "database.postgres.existingSecret" in proc.stderr


def test_ha_gateway_reads_the_database_url_from_a_secret(helm: Helm) -> None:
    render = helm.render("values-ha-postgres")
    deploy = render.find("Deployment", "-gateway")
    assert deploy["spec"]["replicas"] == 3
    assert deploy["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    url = render.env("gateway")["TINKERKUBE_GATEWAY_DATABASE_URL"]
    assert url == {"secretKeyRef": {"name": "tinkerkube-db", "key": "database-url"}}
    assert not render.all("PersistentVolumeClaim", "-gateway-data"), "no SQLite volume with PostgreSQL"
    pdb = render.find("PodDisruptionBudget", "-gateway")
    assert pdb["spec"]["minAvailable"] == 2
    assert pdb["spec"]["selector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]


def test_a_postgres_url_in_values_becomes_a_chart_secret(helm: Helm) -> None:
    render = helm.render("pg-url", "--set", "gateway.replicas=2", "--set", "database.postgres.enabled=true",
                         "--set", "database.postgres.url=postgresql+psycopg://u:p@db:5432/t")
    secret = render.find("Secret", "-database")
    assert secret["stringData"]["database-url"] == "postgresql+psycopg://u:p@db:5432/t"
    ref = render.env("gateway")["TINKERKUBE_GATEWAY_DATABASE_URL"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]


def test_api_keys_come_from_a_secret(helm: Helm) -> None:
    render = helm.render("kind")
    secret = render.find("Secret", "-api-keys")
    assert secret["stringData"]["api-keys"] == '{"tml-kind-e2e":"e2e"}'
    ref = render.env("gateway")["TINKERKUBE_GATEWAY_API_KEYS"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "api-keys"}


def test_without_keys_the_chart_generates_one_instead_of_the_local_dev_key(helm: Helm) -> None:
    secret = helm.render("default").find("Secret", "-api-keys")
    keys = json.loads(secret["stringData"]["api-keys"])
    ((key, tenant),) = keys.items()
    assert key.startswith("tml-") and len(key) >= 40 and key != "tml-local" and tenant == "default"
    assert secret["metadata"]["annotations"]["tinkerkube.dev/generated-api-key"] == "true"


def test_an_existing_api_key_secret_is_used_and_not_created(helm: Helm) -> None:
    render = helm.render("values-gpu")
    assert not render.all("Secret", "-api-keys")
    assert render.env("gateway")["TINKERKUBE_GATEWAY_API_KEYS"]["secretKeyRef"]["name"] == "tinkerkube-api-keys"


def test_gateway_runs_the_kubernetes_backend_in_its_own_namespace(helm: Helm) -> None:
    env = helm.render("default").env("gateway")
    assert env["TINKERKUBE_GATEWAY_BACKEND"] == "kubernetes"
    assert env["TINKERKUBE_GATEWAY_HOST"] == "0.0.0.0"
    assert env["TINKERKUBE_GATEWAY_CHECKPOINT_DIR"] == "/checkpoints"


def test_service_targets_the_gateway_port_and_probes_use_the_health_route(helm: Helm) -> None:
    render = helm.render("default")
    svc = render.find("Service", "-gateway")
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    container = render.container("gateway")
    assert container["ports"][0]["containerPort"] == 8000
    assert container["readinessProbe"]["httpGet"]["path"] == "/api/v1/healthz"
    assert container["command"] == ["python", "-m", "tinkerkube_gateway.main"]


def test_ingress_has_class_host_and_tls_from_values(helm: Helm) -> None:
    render = helm.render("values-ingress-tls")
    ingress = render.find("Ingress", "-gateway")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["tinker.example.com"], "secretName": "tinker-example-com-tls"}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "tinker.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "tk-tinkerkube-gateway", "port": {"name": "http"}}
    assert ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == "letsencrypt"


def test_no_ingress_by_default_and_tls_without_a_host_is_refused(helm: Helm) -> None:
    assert not helm.render("default").all("Ingress")
    proc = helm.template("--set", "ingress.enabled=true", "--set", "ingress.tls.enabled=true", check=False)
    assert proc.returncode != 0 and "needs ingress.host" in proc.stderr


def test_image_tag_defaults_to_the_app_version(helm: Helm) -> None:
    import yaml

    from tests.chart.conftest import CHART

    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert helm.render("default").container("gateway")["image"] == f"ghcr.io/tinkerkube/gateway:{app_version}"
    assert helm.render("kind").container("gateway")["image"] == "tinkerkube/gateway:local"
    assert helm.render("kind").container("gateway")["imagePullPolicy"] == "Never"
