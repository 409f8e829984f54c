"""The launch contract is what both the local backend and the operator's pods run."""

from __future__ import annotations

import json

from tinkerkube_contract import env
from tinkerkube_contract.launch import TRAINER_MODULE, torchrun_argv, trainer_env
from tinkerkube_contract.resource import LoraSpec, SessionMode, TrainingSessionSpec


def _spec(**overrides: object) -> TrainingSessionSpec:
    values: dict[str, object] = {"base_model": "tinkerkube/tiny-qwen3", "model_id": "s:train:0", "owner": "t1"}
    values.update(overrides)
    return TrainingSessionSpec(**values)  # type: ignore[arg-type]


def test_torchrun_argv_runs_the_trainer_module_with_rendezvous_flags() -> None:
    argv = torchrun_argv(nnodes=2, nproc_per_node=4, node_rank=1, master_addr="ts-0.ts", python="python")
    assert argv[:3] == ["python", "-m", "torch.distributed.run"]
    assert "--nnodes=2" in argv and "--nproc_per_node=4" in argv and "--node_rank=1" in argv
    assert "--master_addr=ts-0.ts" in argv
    assert argv[-2:] == ["-m", TRAINER_MODULE]


def test_trainer_env_carries_the_spec_and_round_trips_lora() -> None:
    spec = _spec(lora=LoraSpec(rank=8, train_unembed=False, seed=7), restore_from="tinker://s:train:0/weights/a")
    values = trainer_env(spec, checkpoint_dir="/ckpt", auth_token="tok", model_aliases={"a/b": "tinkerkube/tiny-qwen3"})
    assert values[env.MODEL_ID] == "s:train:0"
    assert values[env.MODE] == SessionMode.TRAIN.value
    assert LoraSpec.model_validate_json(values[env.LORA]) == spec.lora
    assert values[env.RESTORE_FROM] == "tinker://s:train:0/weights/a"
    assert values[env.AUTH_TOKEN] == "tok"
    assert json.loads(values[env.MODEL_ALIASES]) == {"a/b": "tinkerkube/tiny-qwen3"}
    assert all(isinstance(v, str) for v in values.values())


def test_spec_serialises_camel_case_for_kubernetes() -> None:
    body = _spec(procs_per_pod=2).to_k8s()
    assert body["baseModel"] == "tinkerkube/tiny-qwen3" and body["procsPerPod"] == 2
    assert TrainingSessionSpec.model_validate(body).procs_per_pod == 2
