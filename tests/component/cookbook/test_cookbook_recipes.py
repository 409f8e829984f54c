"""tinker-cookbook's own recipes, unmodified, run to completion offline against a local-mode gateway.

Option A of tinker-protocol.md §6.3: the tiny model's directory is the `model_name` (the cookbook loads
its tokenizer from there; the gateway resolves the same path to a local model), `renderer_name=role_colon`
(no model-table lookup), the cookbook's bundled conversations.jsonl for SL and the synthetic arithmetic
env for RL. Each recipe is a subprocess (`python -m tinker_cookbook.recipes...`) with the Hub switched off,
and the assertions read what it wrote: metrics.jsonl (one line per step, finite losses) and
checkpoints.jsonl (whose final paths must be in the gateway's registry, asked through the SDK's RestClient).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tinker_cookbook

from tests.support.sdk import DEV_KEY

pytestmark = pytest.mark.slow

COOKBOOK_DIR = Path(tinker_cookbook.__file__).resolve().parent
CONVERSATIONS = COOKBOOK_DIR / "example_data" / "conversations.jsonl"
API_KEY = DEV_KEY  # the gateway's local dev key (no keys configured)
RECIPE_TIMEOUT_S = 420
LOCAL_HUB_DATASETS = Path(__file__).resolve().parent / "local_hub_datasets.py"


def recipe_env(base_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINKER_", "WANDB_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TINKER_API_KEY=API_KEY,
               TINKER_TELEMETRY="0", TINKER_BASE_URL=base_url, PYTHONUNBUFFERED="1")
    return env


def run_recipe(module: str, args: dict[str, object], base_url: str, cwd: Path, *,
               base_url_arg: bool = True,
               hub_datasets: dict[str, dict[str, str]] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m module base_url=... key=value ...` (recipes without a `base_url` option read
    TINKER_BASE_URL); with `hub_datasets` ({hub id: {split: jsonl}}) the module runs under
    local_hub_datasets.py, which serves those hub datasets from the local files."""
    recipe_args = [*([f"base_url={base_url}"] if base_url_arg else []), *(f"{k}={v}" for k, v in args.items())]
    if hub_datasets is None:
        argv = [sys.executable, "-m", module, *recipe_args]
    else:
        argv = [sys.executable, str(LOCAL_HUB_DATASETS), json.dumps(hub_datasets), module, *recipe_args]
    env = recipe_env(base_url)
    env["HF_DATASETS_CACHE"] = str(cwd / "hf-datasets-cache")  # the json builder's cache: per test, not ~
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=RECIPE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{module} exited {done.returncode}\n--- stdout\n{done.stdout[-6000:]}" \
                                 f"\n--- stderr\n{done.stderr[-8000:]}"
    return done


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    assert path.exists(), f"{path} was not written"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def assert_final_checkpoints_registered(log_path: Path, base_url: str, base_model: str) -> dict[str, Any]:
    """checkpoints.jsonl's `final` record names a state and a sampler path, and the gateway knows both."""
    import tinker

    records = read_jsonl(log_path / "checkpoints.jsonl")
    final = [r for r in records if r.get("name") == "final"]
    assert final, f"no final checkpoint in {records}"
    state_path, sampler_path = final[-1]["state_path"], final[-1]["sampler_path"]
    assert state_path.startswith("tinker://") and "/weights/" in state_path, state_path
    assert sampler_path.startswith("tinker://") and "/sampler_weights/" in sampler_path, sampler_path

    rest = tinker.RestClient(base_url=base_url, api_key=API_KEY)
    run = rest.get_training_run_by_tinker_path(state_path).result(timeout=60)
    assert run.base_model == base_model
    listed = {c.tinker_path for c in rest.list_checkpoints(run.training_run_id).result(timeout=60).checkpoints}
    assert {state_path, sampler_path} <= listed, f"final checkpoints missing from the registry: {listed}"
    return final[-1]


def test_chat_sl_trains_on_the_bundled_conversations_and_saves_final_checkpoints(
        cookbook_gateway: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "sl"
    steps, batch_size = 3, 8
    run_recipe("tinker_cookbook.recipes.chat_sl.train", {
        "model_name": tiny_model_dir, "renderer_name": "role_colon", "dataset": CONVERSATIONS,
        "batch_size": batch_size, "max_length": 512, "max_steps": steps, "learning_rate": 1e-3, "lora_rank": 8,
        "save_every": 0, "eval_every": 0, "infrequent_eval_every": 0,
        "behavior_if_log_dir_exists": "delete", "log_path": log_path}, cookbook_gateway, tmp_path)

    metrics = read_jsonl(log_path / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))  # the cookbook logs steps from 1
    for m in metrics:
        assert m["num_sequences"] == batch_size and m["num_tokens"] > batch_size, m
        assert finite(m["train_mean_nll"]) and 0 < m["train_mean_nll"] < 20, m  # from the trainer's logprobs
        assert finite(m.get("grad_norm")) and m["grad_norm"] > 0, m  # optim_step's metrics: real gradients
    assert_final_checkpoints_registered(log_path, cookbook_gateway, str(tiny_model_dir))


def test_math_rl_arithmetic_with_importance_sampling_runs_its_steps_and_saves(
        cookbook_gateway: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    # The dev extra installs tinker-cookbook[math-rl]; a missing module is a broken install, not a skip.
    assert importlib.util.find_spec("math_verify") is not None, "install the project's dev extra (make venv)"
    log_path = tmp_path / "rl"
    steps, groups, group_size = 2, 4, 4
    run_recipe("tinker_cookbook.recipes.math_rl.train", {
        "model_name": tiny_model_dir, "renderer_name": "role_colon", "env": "arithmetic",
        "loss_fn": "importance_sampling", "group_size": group_size, "groups_per_batch": groups, "max_tokens": 5,
        "max_steps": steps, "learning_rate": 1e-4, "lora_rank": 8, "eval_every": 0, "save_every": 0,
        "behavior_if_log_dir_exists": "delete", "log_path": log_path}, cookbook_gateway, tmp_path)

    metrics = read_jsonl(log_path / "metrics.jsonl")
    train = [m for m in metrics if "env/all/reward/total" in m]
    assert [m["step"] for m in train] == list(range(1, steps + 1)), metrics  # the cookbook logs steps from 1
    for m in train:
        assert m["env/all/total_episodes"] == groups * group_size, m
        assert finite(m["env/all/reward/total"]), m
        assert 0 < m["env/all/ac_tokens_per_turn"] <= 5, m  # tokens were really sampled, max_tokens honoured
        assert finite(m["optim/entropy"]) and m["optim/entropy"] > 0, m
        # On-policy: the sampler's logprobs and the trainer's forward logprobs of the same tokens agree.
        assert abs(m["optim/kl_sample_train_v1"]) < 1e-3, m
    assert_final_checkpoints_registered(log_path, cookbook_gateway, str(tiny_model_dir))
