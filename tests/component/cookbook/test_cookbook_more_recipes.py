"""More of tinker-cookbook's recipes, unmodified, run offline against the local-mode gateway (real trainers
on the tiny Qwen3, the real SDK): `preference/shorter` (pairwise-preference RL), `multiplayer_rl/guess_number`
(multi-turn RL), `preference/dpo` (DPO: a reference sampler's logprobs plus a client-side custom loss) and
`rubric` (RL graded by a second model's sampled answers).

As in test_cookbook_recipes.py each recipe is `python -m tinker_cookbook.recipes...` with the tiny model's
directory as `model_name` and `renderer_name=role_colon`. shorter and guess_number generate their own data,
rubric's comes from the cookbook's generate_data;
the DPO recipe's `dataset=hhh` reads `Anthropic/hh-rlhf` from the Hub, so local_hub_datasets.py serves that
one hub id from JSON Lines files written here in the same format (nothing else in the recipe changes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tinker_cookbook.recipes.multiplayer_rl.guess_number.env import FAIL_TO_PARSE, FORMAT_PENALTY, MAX_TURNS

from tests.component.cookbook.test_cookbook_recipes import (
    assert_final_checkpoints_registered,
    finite,
    read_jsonl,
    run_recipe,
)

pytestmark = pytest.mark.slow


def train_metrics(log_path: Path, steps: int) -> list[dict[str, float]]:
    metrics = [m for m in read_jsonl(log_path / "metrics.jsonl") if "env/all/reward/total" in m]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1)), metrics  # the cookbook logs steps from 1
    return metrics


def test_preference_shorter_rewards_by_pairwise_length_and_moves_the_policy(
        cookbook_gateway: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "shorter"
    steps, batch, group = 2, 2, 4
    run_recipe("tinker_cookbook.recipes.preference.shorter.train", {
        "model_name": tiny_model_dir, "renderer_name": "role_colon", "batch_size": batch, "group_size": group,
        "max_tokens": 8, "max_steps": steps, "learning_rate": 1e-3, "eval_every": 0,
        "behavior_if_log_dir_exists": "delete", "log_path": log_path}, cookbook_gateway, tmp_path,
        base_url_arg=False)

    for m in train_metrics(log_path, steps):
        assert m["env/all/total_episodes"] == batch * group, m
        # Each pairwise matchup adds +r to one completion and -r to the other: the mean is zero ...
        assert abs(m["env/all/win_minus_loss"]) < 1e-6, m
        # ... and the preference model saw completions of different lengths, so groups got mixed rewards
        # (a group of ties would be filtered out as constant-reward and train nothing).
        assert m["env/all/by_group/frac_mixed"] > 0, m
        assert -2 <= m["env/all/reward/total"] <= 1, m
        assert finite(m["grad_norm"]) and m["grad_norm"] > 0, m
        assert abs(m["optim/kl_sample_train_v1"]) < 1e-3, m  # sampler and trainer agree on-policy
        # compute_post_kl: the sampler's logprobs after the step differ from before it, the update landed.
        assert finite(m["kl_pre_post_v2"]) and m["kl_pre_post_v2"] > 0, m
    assert_final_checkpoints_registered(log_path, cookbook_gateway, str(tiny_model_dir))


def test_guess_number_plays_multi_turn_episodes_and_trains_on_them(
        cookbook_gateway: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "guess"
    batch, group = 1, 2
    run_recipe("tinker_cookbook.recipes.multiplayer_rl.guess_number.train", {
        "model_name": tiny_model_dir, "renderer_name": "role_colon", "batch_size": batch, "group_size": group,
        "max_tokens": 6, "max_steps": 1, "learning_rate": 1e-3, "eval_every": 0, "save_every": 0,
        "behavior_if_log_dir_exists": "delete", "log_path": log_path}, cookbook_gateway, tmp_path,
        base_url_arg=False)

    (m,) = train_metrics(log_path, 1)
    assert m["env/all/total_episodes"] == batch * group, m
    assert 0 < m["env/all/ac_tokens_per_turn"] <= 6, m
    assert abs(m["optim/kl_sample_train_v1"]) < 1e-3, m  # the multi-turn tokens the trainer saw were sampled
    episodes = read_jsonl(log_path / "iteration_000000" / "train_rollout_summaries.jsonl")
    assert len(episodes) == batch * group
    for episode in episodes:
        turns = episode["steps"]
        assert 1 <= len(turns) <= MAX_TURNS and turns[-1]["episode_done"], episode
        # Every turn's observation is the whole conversation so far: it grows by the guess and the reply.
        lengths = [t["ob_len"] for t in turns] + [episode["final_ob_len"]]
        assert lengths == sorted(set(lengths)), lengths
        for t in turns:  # the env's own judging of each guess, turn by turn
            expected = FORMAT_PENALTY if t["logs"]["feedback"] == FAIL_TO_PARSE else \
                {"Correct": 1.0, "Too low": 0.0, "Too high": 0.0}[t["logs"]["feedback"]]
            assert t["reward"] == expected, t
        assert math.isclose(episode["total_reward"], sum(t["reward"] for t in turns)), episode
    assert_final_checkpoints_registered(log_path, cookbook_gateway, str(tiny_model_dir))


def write_hh_rlhf(directory: Path, *, train: int, test: int) -> dict[str, str]:
    """Anthropic/hh-rlhf's format (`chosen`/`rejected` transcripts sharing all but the last reply): the
    chosen reply answers the sum, the rejected one does not."""
    directory.mkdir(parents=True)
    files = {}
    for split, n in (("train", train), ("test", test)):
        path = directory / f"{split}.jsonl"
        with path.open("w") as f:
            for i in range(n):
                a, b = 3 + i, 5 + 2 * i
                prompt = f"\n\nHuman: What is {a} + {b}?\n\nAssistant:"
                f.write(json.dumps({"chosen": f"{prompt} {a} + {b} = {a + b}",
                                    "rejected": f"{prompt} I do not know."}) + "\n")
        files[split] = str(path)
    return files


def test_dpo_recipe_starts_at_log2_against_its_reference_sampler_and_lowers_the_loss(
        cookbook_gateway: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "dpo"
    steps, pairs = 4, 4
    run_recipe("tinker_cookbook.recipes.preference.dpo.train", {
        "model_name": tiny_model_dir, "renderer_name": "role_colon", "dataset": "hhh", "batch_size": pairs,
        "max_length": 256, "max_steps": steps, "learning_rate": 1e-3, "dpo_beta": 0.1,
        "behavior_if_log_dir_exists": "delete", "log_path": log_path}, cookbook_gateway, tmp_path,
        hub_datasets={"Anthropic/hh-rlhf": write_hh_rlhf(tmp_path / "hh-rlhf", train=4 * pairs, test=2)})

    metrics = read_jsonl(log_path / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(steps)), metrics  # train_dpo logs steps from 0
    for m in metrics:
        assert m["num_pairs"] == pairs and finite(m["dpo_loss"]), m
    first, last = metrics[0], metrics[-1]
    # Step 0: the policy is the reference. The reference logprobs come from the sampler
    # (save_weights_and_get_sampling_client + compute_logprobs), the policy's from the trainer's forward
    # pass; they agree, so every log-ratio is 0 and the loss is exactly log 2.
    assert abs(first["dpo_loss"] - math.log(2)) < 1e-4, first
    assert abs(first["margin"]) < 1e-4, first
    # Training through forward_backward_custom moves the policy towards the chosen replies.
    losses = [m["dpo_loss"] for m in metrics]
    assert losses == sorted(losses, reverse=True) and last["dpo_loss"] < first["dpo_loss"] - 0.05, losses
    assert last["accuracy"] == 1.0 and last["margin"] > 0 and last["chosen_reward"] > last["rejected_reward"], last
    # The hhh test split is evaluated by the sampler (SamplerNLLEvaluator) at the first and the last step.
    assert finite(first["test/nll"]) and finite(last["test/nll"]), (first, last)
    assert_final_checkpoints_registered(log_path, cookbook_gateway, str(tiny_model_dir))


def test_rubric_recipe_grades_each_rollout_with_a_grader_model(
        cookbook_gateway: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The grader is a second sampling client on a base model (here the tiny model too, through its own
    renderer); the cookbook's generate_data writes the addition datapoints with their rubrics."""
    from tinker_cookbook.recipes.rubric.generate_data import generate_dataset

    train_jsonl, test_jsonl = generate_dataset(num_train=2, num_test=1, seed=0, write_dir=str(tmp_path))
    log_path = tmp_path / "rubric"
    groups, group = 1, 2
    run_recipe("tinker_cookbook.recipes.rubric.train", {
        "model_name": tiny_model_dir, "renderer_name": "role_colon", "grader_llm_name": tiny_model_dir,
        "grader_renderer_name": "role_colon", "train_jsonl_path": train_jsonl, "test_jsonl_path": test_jsonl,
        "groups_per_batch": groups, "train_group_size": group, "max_tokens": 8, "lora_rank": 8, "max_steps": 1,
        "learning_rate": 1e-3, "eval_every": 0, "save_every": 0, "behavior_if_log_dir_exists": "delete",
        "log_path": log_path}, cookbook_gateway, tmp_path)

    (m,) = train_metrics(log_path, 1)
    assert m["env/all/total_episodes"] == groups * group, m
    # Every rollout was graded: the env's rubric score and format flag are in [0, 1] and make its reward.
    assert 0 <= m["env/all/rubric_score"] <= 1 and 0 <= m["env/all/format"] <= 1, m
    assert math.isclose(m["env/all/reward/total"], m["env/all/rubric_score"] + 0.1 * (m["env/all/format"] - 1),
                        abs_tol=1e-6), m
    assert abs(m["optim/kl_sample_train_v1"]) < 1e-3, m
    # The env's log tree holds one grade per rollout with the grader's sampled answer ("Model output").
    tree = (log_path / "iteration_000000" / "train_logtree.json").read_text()
    assert tree.count("Rubric 1: score=") == tree.count('"Model output"') == groups * group, tree[:2000]
    assert_final_checkpoints_registered(log_path, cookbook_gateway, str(tiny_model_dir))
