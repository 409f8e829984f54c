"""Chart values map 1:1 onto the components' settings: every TINKERKUBE_* variable the chart sets is a field of
GatewaySettings / OperatorSettings (pydantic-settings ignores unknown variables silently, so a typo here would
be a setting that never applies), and the trainer pods get their token under the contract's name."""

from __future__ import annotations

import importlib

import pytest

from tests.chart.conftest import VALUES_SETS, Helm
from tinkerkube_contract import env as trainer_env

SETTINGS = {
    "gateway": ("tinkerkube_gateway.settings", "GatewaySettings", "TINKERKUBE_GATEWAY_"),
    "operator": ("tinkerkube_operator.settings", "OperatorSettings", "TINKERKUBE_OPERATOR_"),
}


def _fields(component: str) -> set[str]:
    module, cls, prefix = SETTINGS[component]
    settings = getattr(importlib.import_module(module), cls)
    return {prefix + name.upper() for name in settings.model_fields}


@pytest.mark.parametrize("values_set", sorted(VALUES_SETS))
@pytest.mark.parametrize("component", sorted(SETTINGS))
def test_every_variable_the_chart_sets_is_a_settings_field(helm: Helm, component: str, values_set: str) -> None:
    prefix = SETTINGS[component][2]
    rendered = {name for name in helm.render(values_set).env(component) if name.startswith(prefix)}
    unknown = sorted(rendered - _fields(component))
    assert not unknown, f"{component} has no settings field for {unknown}"


def test_operator_settings_accept_the_rendered_values(helm: Helm, monkeypatch: pytest.MonkeyPatch) -> None:
    from tinkerkube_operator.settings import OperatorSettings

    for values_set in ("default", "kind", "values-ha-postgres"):
        for name, value in helm.render(values_set).env("operator").items():
            if isinstance(value, str) and name.startswith("TINKERKUBE_OPERATOR_"):
                monkeypatch.setenv(name, value)
        settings = OperatorSettings()
        assert settings.trainer_image and settings.namespaces == ["tinkerkube"]


@pytest.mark.parametrize("values_set", sorted(VALUES_SETS))
def test_gateway_settings_accept_the_rendered_values(helm: Helm, monkeypatch: pytest.MonkeyPatch,
                                                     values_set: str) -> None:
    from tinkerkube_gateway.settings import BackendKind, GatewaySettings

    render = helm.render(values_set)
    for name, value in render.env("gateway").items():
        if isinstance(value, str) and name.startswith("TINKERKUBE_GATEWAY_"):
            monkeypatch.setenv(name, value)
    settings = GatewaySettings()
    assert settings.backend is BackendKind.KUBERNETES
    assert settings.port == render.container("gateway")["ports"][0]["containerPort"]


def test_gpu_defaults_reach_the_gateway_settings(helm: Helm, monkeypatch: pytest.MonkeyPatch) -> None:
    from tinkerkube_gateway.settings import GatewaySettings

    for name, value in helm.render("values-gpu").env("gateway").items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    settings = GatewaySettings()
    assert (settings.trainer_gpus, settings.trainer_nproc_per_node) == (4, 4)
    assert settings.trainer_node_selector == {"nvidia.com/gpu.present": "true"}
    assert settings.trainer_tolerations[0]["key"] == "nvidia.com/gpu"
    assert settings.trainer_priority_class_name == "training"


def test_kind_values_point_the_operator_at_the_local_cpu_trainer_image(helm: Helm) -> None:
    env = helm.render("kind").env("operator")
    assert env["TINKERKUBE_OPERATOR_TRAINER_IMAGE"] == "tinkerkube/trainer:local-cpu"
    assert env["TINKERKUBE_OPERATOR_IMAGE_PULL_POLICY"] == "Never"
    assert env["TINKERKUBE_OPERATOR_CHECKPOINT_HOST_PATH"] == "/var/lib/tinkerkube/checkpoints"
    assert "TINKERKUBE_OPERATOR_CHECKPOINT_PVC" not in env


def test_operator_hands_trainers_the_shared_token_secret(helm: Helm) -> None:
    render = helm.render("default")
    env = render.env("operator")
    secret = render.find("Secret", "-trainer-token")
    assert env["TINKERKUBE_OPERATOR_AUTH_TOKEN_SECRET"] == secret["metadata"]["name"]
    assert env["TINKERKUBE_OPERATOR_AUTH_TOKEN_SECRET_KEY"] in secret["data"]
    # The operator's manifests put it on trainer pods as the contract's variable.
    assert trainer_env.AUTH_TOKEN == "TINKERKUBE_TRAINER_AUTH_TOKEN"
