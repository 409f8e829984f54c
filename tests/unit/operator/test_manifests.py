"""manifests.py: spec → Pods + headless Service, built with the contract's launch helpers."""

from __future__ import annotations

from typing import Any

from tinkerkube_contract import env, launch, pod_api
from tinkerkube_contract.resource import (
    LABEL_GENERATION,
    LABEL_NODE_RANK,
    LABEL_ROLE,
    LABEL_SESSION,
    LABEL_TENANT,
    LABEL_TINKER_SESSION,
    RENDEZVOUS_PORT,
    TRAINER_PORT,
    CheckpointStore,
    Resources,
    TrainingSessionSpec,
)
from tinkerkube_operator import manifests
from tinkerkube_operator.manifests import PodConfig, SessionRef

CFG = PodConfig(image="reg/trainer:1", token_secret="tok", model_cache_dir="/models")
REF = SessionRef("run-a", "team", generation=2)


def _spec(**kw: Any) -> TrainingSessionSpec:
    return TrainingSessionSpec(base_model="tiny", model_id="s1:train:0", owner="Tenant A", **kw)


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


def test_one_pod_per_replica_with_node_rank_and_generation_labels() -> None:
    pods = manifests.pods(REF, _spec(replicas=3), CFG)
    assert [p["metadata"]["name"] for p in pods] == ["run-a-g2-0", "run-a-g2-1", "run-a-g2-2"]
    labels = pods[1]["metadata"]["labels"]
    assert labels[LABEL_NODE_RANK] == "1" and labels[LABEL_GENERATION] == "2"
    assert labels[LABEL_SESSION] == "run-a" and labels[LABEL_ROLE] == "trainer"
    assert labels[LABEL_TENANT].startswith("Tenant-A-")  # sanitised, hash-suffixed


def test_command_is_the_contract_torchrun_argv_with_rank0_dns_as_master() -> None:
    pod = manifests.pod(REF, _spec(replicas=2, procs_per_pod=4), CFG, 1)
    expected = launch.torchrun_argv(nnodes=2, nproc_per_node=4, node_rank=1,
                                    master_addr="g2-r0.run-a.team.svc.cluster.local", python="python")
    assert pod["spec"]["containers"][0]["command"] == expected
    assert pod["spec"]["hostname"] == "g2-r1" and pod["spec"]["subdomain"] == "run-a"


def test_env_is_the_contract_trainer_env_plus_token_from_secret() -> None:
    spec = _spec(restore_from="tinker://s1:train:0/weights/a")
    values = _env(manifests.pod(REF, spec, CFG, 0))
    expected = launch.trainer_env(spec, checkpoint_dir="/checkpoints", model_cache_dir="/models")
    assert {k: values[k] for k in expected} == expected
    assert values[env.AUTH_TOKEN] == {"secretKeyRef": {"name": "tok", "key": "token", "optional": False}}


def test_restore_from_override_wins_over_spec_when_recreating() -> None:
    spec = _spec(restore_from="tinker://s1:train:0/weights/a")
    values = _env(manifests.pod(REF, spec, CFG, 0, restore_from="tinker://s1:train:0/weights/b"))
    assert values[env.RESTORE_FROM] == "tinker://s1:train:0/weights/b"


def test_no_token_env_without_a_secret() -> None:
    assert env.AUTH_TOKEN not in _env(manifests.pod(REF, _spec(), PodConfig(image="x"), 0))


def test_gpus_are_requested_and_limited_and_device_is_cuda() -> None:
    pod = manifests.pod(REF, _spec(resources=Resources(gpus=2, cpu="4", memory="8Gi")), CFG, 0)
    res = pod["spec"]["containers"][0]["resources"]
    assert res["requests"] == {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "2"}
    assert res["limits"] == {"memory": "8Gi", "nvidia.com/gpu": "2"}
    assert _env(pod)[env.DEVICE] == "cuda"


def test_cpu_only_pods_request_no_gpu() -> None:
    pod = manifests.pod(REF, _spec(), CFG, 0)
    assert "nvidia.com/gpu" not in str(pod["spec"]["containers"][0]["resources"])


def test_probes_hit_the_pod_api_paths_on_the_trainer_port() -> None:
    c = manifests.pod(REF, _spec(), CFG, 0)["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"] == {"path": pod_api.READY_PATH, "port": TRAINER_PORT}
    assert c["livenessProbe"]["httpGet"] == {"path": pod_api.HEALTH_PATH, "port": TRAINER_PORT}


def test_checkpoint_volume_follows_spec_then_operator_default() -> None:
    pvc = manifests.pod(REF, _spec(checkpoint_store=CheckpointStore(pvc_name="ckpt")), CFG, 0)
    assert pvc["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "ckpt"}
    host = manifests.pod(REF, _spec(checkpoint_store=CheckpointStore(host_path="/data", mount_path="/c")), CFG, 0)
    assert host["spec"]["volumes"][0]["hostPath"]["path"] == "/data"
    assert host["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] == "/c"
    assert _env(host)[env.CHECKPOINT_DIR] == "/c"
    default = manifests.pod(REF, _spec(), PodConfig(image="x", checkpoint_pvc="shared"), 0)
    assert default["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "shared"}


def test_scheduling_fields_are_passed_through() -> None:
    tol = [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    pod = manifests.pod(REF, _spec(node_selector={"pool": "a100"}, tolerations=tol, priority_class_name="hi"), CFG, 0)
    assert pod["spec"]["nodeSelector"] == {"pool": "a100"} and pod["spec"]["tolerations"] == tol
    assert pod["spec"]["priorityClassName"] == "hi" and pod["spec"]["restartPolicy"] == "Never"


def test_image_comes_from_spec_or_the_default() -> None:
    assert manifests.pod(REF, _spec(), CFG, 0)["spec"]["containers"][0]["image"] == "reg/trainer:1"
    assert manifests.pod(REF, _spec(image="mine:2"), CFG, 0)["spec"]["containers"][0]["image"] == "mine:2"


def test_headless_service_publishes_not_ready_pods_for_rendezvous() -> None:
    svc = manifests.headless_service(REF, _spec(tinker_session="sess-1"))
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {LABEL_SESSION: "run-a", LABEL_ROLE: "trainer"}
    assert {p["port"] for p in svc["spec"]["ports"]} == {TRAINER_PORT, RENDEZVOUS_PORT}
    assert svc["metadata"]["labels"][LABEL_TINKER_SESSION] == "sess-1"


def test_label_values_are_always_valid_and_stable() -> None:
    for raw in ["a", "x" * 100, "tenant@example.com", "-odd-", "s:train:0"]:
        value = manifests.label_value(raw)
        assert len(value) <= 63 and value[0].isalnum() and value[-1].isalnum()
        assert manifests.label_value(raw) == value
    assert manifests.label_value("x" * 100) != manifests.label_value("x" * 99)


def test_trainer_pods_run_non_root_without_privilege_escalation() -> None:
    pod = manifests.pod(REF, _spec(), CFG, 0)
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == security["fsGroup"] == CFG.run_as_user != 0  # fsGroup: writable checkpoints
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["spec"]["containers"][0]["securityContext"]
    assert container == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                         "capabilities": {"drop": ["ALL"]}}


def test_the_read_only_root_leaves_tmp_writable_as_an_empty_dir() -> None:
    # torchrun makes its log dir with tempfile.mkdtemp at start: without a writable /tmp it dies at once
    # (found by the image tier, tests/images).
    pod = manifests.pod(REF, _spec(), CFG, 0)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert volumes[mounts["/tmp"]] == {"name": mounts["/tmp"], "emptyDir": {}}


def test_dev_shm_is_an_in_memory_volume_sized_by_config() -> None:
    pod = manifests.pod(REF, _spec(), PodConfig(image="i", shm_size="2Gi"), 0)
    shm = next(v for v in pod["spec"]["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory")
    assert shm["emptyDir"]["sizeLimit"] == "2Gi"
    mounts = pod["spec"]["containers"][0]["volumeMounts"]
    assert {"name": shm["name"], "mountPath": "/dev/shm"} in mounts
    no_shm = manifests.pod(REF, _spec(), PodConfig(image="i", shm_size=""), 0)
    assert all(m["mountPath"] != "/dev/shm" for m in no_shm["spec"]["containers"][0]["volumeMounts"])
