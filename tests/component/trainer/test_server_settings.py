"""The trainer reads exactly what the launchers write (contract launch.trainer_env) and torchrun's variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinkerkube_contract import env
from tinkerkube_contract.launch import trainer_env
from tinkerkube_contract.resource import LoraSpec, SessionMode, TrainingSessionSpec
from tinkerkube_trainer.settings import DistEnv, TrainerSettings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.startswith(env.PREFIX) or name in DistEnv.model_fields:
            monkeypatch.delenv(name)
    return monkeypatch


def test_the_launcher_environment_becomes_the_pool_config_and_boot_run(clean_env: pytest.MonkeyPatch) -> None:
    spec = TrainingSessionSpec(base_model="tinkerkube/tiny-qwen3", model_id="sess-a:train:3", owner="t",
                               mode=SessionMode.TRAIN, lora=LoraSpec(rank=8, alpha=16, train_mlp=False, seed=5),
                               restore_from="tinker://sess-a:train:3/weights/step2", restore_optimizer=True)
    values = trainer_env(spec, checkpoint_dir="/ckpt", port=0, host="127.0.0.1", auth_token="s3cret-value",
                         model_cache_dir="/models", model_aliases={"small": "/models/x"}, device="cpu",
                         sharding="fsdp", sampler="vllm")
    for name, value in values.items():
        clean_env.setenv(name, value)
    settings = TrainerSettings()
    config, run = settings.pool_config(), settings.boot_run()
    assert run is not None and config.base_model == spec.base_model == run.base_model
    assert (run.model_id, run.mode) == (spec.model_id, SessionMode.TRAIN)
    assert run.lora == spec.lora and run.restore_from == spec.restore_from and run.restore_optimizer
    assert (config.checkpoint_dir, config.model_cache_dir) == (Path("/ckpt"), Path("/models"))
    assert config.model_aliases == {"small": "/models/x"} and config.device == "cpu" and config.sharding == "fsdp"
    assert config.sampler == "vllm"
    assert (settings.host, settings.port, settings.token) == ("127.0.0.1", 0, "s3cret-value")
    assert "s3cret-value" not in repr(settings)  # the token is a secret
    assert TrainerSettings(**{k: v for k, v in settings.model_dump().items()}).to_env() == settings.to_env()


def test_missing_or_bad_values_are_refused(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="base_model"):
        TrainerSettings()
    clean_env.setenv(env.BASE_MODEL, "b")
    assert TrainerSettings().boot_run() is None  # a pool with no run yet
    clean_env.setenv(env.MODEL_ID, "m")
    clean_env.setenv(env.DEVICE, "tpu")
    with pytest.raises(ValueError, match="device"):
        TrainerSettings()
    clean_env.setenv(env.DEVICE, "cpu")
    assert TrainerSettings().pool_config().sharding == "replicate"
    clean_env.setenv(env.SHARDING, "zero3")
    with pytest.raises(ValueError, match="sharding"):
        TrainerSettings()


def test_dist_env_defaults_to_one_rank_and_reads_torchrun(clean_env: pytest.MonkeyPatch) -> None:
    alone = DistEnv()
    assert (alone.rank, alone.world_size, alone.is_leader, alone.under_torchrun) == (0, 1, True, False)
    for name, value in {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                        "GROUP_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29511",
                        "TORCHELASTIC_RUN_ID": "x"}.items():
        clean_env.setenv(name, value)
    dist = DistEnv()
    assert (dist.rank, dist.local_rank, dist.world_size, dist.node_rank) == (3, 1, 4, 1)
    assert (dist.MASTER_ADDR, dist.MASTER_PORT, dist.is_leader, dist.under_torchrun) == ("10.0.0.1", 29511, False, True)
