"""How a trainer pool's process group is started: the torchrun command and the environment.

One implementation for both launchers: the gateway's local backend runs it as a subprocess and the
operator puts it into the Pod's container. Pure: no process is started here.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from tinkerkube_contract import env
from tinkerkube_contract.resource import RENDEZVOUS_PORT, TRAINER_PORT, TrainingSessionSpec

TRAINER_MODULE = "tinkerkube_trainer.main"


def torchrun_argv(
    *,
    nnodes: int,
    nproc_per_node: int,
    node_rank: int | str,
    master_addr: str,
    master_port: int = RENDEZVOUS_PORT,
    python: str | None = None,
) -> list[str]:
    """`python -m torch.distributed.run` rather than the `torchrun` script: it works in any venv
    without PATH games, and the pod image and the local backend run the same argv."""
    return [
        python or sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc_per_node={nproc_per_node}",
        f"--node_rank={node_rank}",
        f"--master_addr={master_addr}",
        f"--master_port={master_port}",
        "-m",
        TRAINER_MODULE,
    ]


def pool_env(
    base_model: str,
    *,
    checkpoint_dir: str,
    port: int = TRAINER_PORT,
    host: str = "0.0.0.0",
    auth_token: str | None = None,
    model_cache_dir: str | None = None,
    model_aliases: dict[str, str] | None = None,
    device: str = "auto",
    max_runs: int | None = None,
    max_lora_rank: int | None = None,
    auto_checkpoint_steps: int | None = None,
    sharding: str | None = None,
    sampler: str | None = None,
    pass_journal: str | None = None,
) -> dict[str, str]:
    """A trainer pool with no run yet: runs attach over the pod API."""
    values = {
        env.BASE_MODEL: base_model,
        env.CHECKPOINT_DIR: checkpoint_dir,
        env.HOST: host,
        env.PORT: str(port),
        env.DEVICE: device,
    }
    if auth_token:
        values[env.AUTH_TOKEN] = auth_token
    if model_cache_dir:
        values[env.MODEL_CACHE_DIR] = model_cache_dir
    if model_aliases:
        values[env.MODEL_ALIASES] = json.dumps(model_aliases, sort_keys=True)
    if max_runs is not None:
        values[env.MAX_RUNS] = str(max_runs)
    if max_lora_rank is not None:
        values[env.MAX_LORA_RANK] = str(max_lora_rank)
    if auto_checkpoint_steps is not None:
        values[env.AUTO_CHECKPOINT_STEPS] = str(auto_checkpoint_steps)
    if sharding is not None:
        values[env.SHARDING] = sharding
    if sampler is not None:
        values[env.SAMPLER] = sampler
    if pass_journal is not None:
        values[env.PASS_JOURNAL] = pass_journal
    return values


def trainer_env(spec: TrainingSessionSpec, **pool: Any) -> dict[str, str]:
    """A pool started for one run (`spec`), which it attaches at boot. `pool`: `pool_env`'s keywords."""
    values = pool_env(spec.base_model, **pool)
    values.update({
        env.MODEL_ID: spec.model_id,
        env.MODE: spec.mode.value,
        env.LORA: spec.lora.model_dump_json(),
        env.RESTORE_OPTIMIZER: "true" if spec.restore_optimizer else "false",
    })
    if spec.restore_from:
        values[env.RESTORE_FROM] = spec.restore_from
    return values
