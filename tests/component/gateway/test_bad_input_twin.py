"""Bad input never poisons a run's math (issue 9): a real LoRA run on the tiny model that got every kind
of refused request between its forward_backward and its optim_step (gradients accumulated) ends exactly
where its twin, which got only the good requests, ends: same step metrics, same logprobs after the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import tinker
from tinker import types

from tests.component.gateway.conftest import TINY

pytestmark = pytest.mark.slow


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def _rl_datum(tokens: list[int]) -> types.Datum:
    n = len(tokens) - 1
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "logprobs": [-2.0] * n, "advantages": [1.0] * n})


DATA = [_datum([1, 5, 9, 2, 7, 3]), _datum([4, 4, 8, 1, 6])]


def _refused(training: tinker.TrainingClient) -> list[tuple[Callable[[], Any], str]]:
    rl = [_rl_datum([3, 1, 4, 1, 5])]
    return [
        (lambda: training.optim_step(types.AdamParams(learning_rate=-1.0)), "learning_rate"),
        (lambda: training.optim_step(types.AdamParams(learning_rate=math.inf)), "finite number"),
        (lambda: training.optim_step(types.AdamParams(learning_rate=1e-2, beta1=math.nan)), "beta1"),
        (lambda: training.forward_backward(rl, "dro", {"beta": math.nan}), "loss_fn_config"),
        (lambda: training.forward_backward(rl, "ppo", {"clip_low_threshold": -math.inf}), "loss_fn_config"),
        (lambda: training.forward_backward(rl, "cispo", {"clip_high_threshold": math.inf}), "loss_fn_config"),
        (lambda: training.save_state("bad", ttl_seconds=-5), "ttl_seconds"),
        (lambda: training.save_weights_for_sampler("bad", ttl_seconds=-1), "ttl_seconds"),
        (lambda: training.save_weights_external("bad", age_encryption_recipients=["not-a-key"]),
         "age_encryption_recipients"),
    ]


def _train(client: tinker.ServiceClient, *, with_bad_input: bool) -> tuple[dict[str, float], list[list[float]]]:
    training = client.create_lora_training_client(base_model=TINY, rank=4, seed=11).result()
    training.forward_backward(DATA, "cross_entropy").result()
    if with_bad_input:
        for call, phrase in _refused(training):
            with pytest.raises(tinker.BadRequestError, match=phrase):
                call().result()
    metrics = training.optim_step(types.AdamParams(learning_rate=5e-2)).result().metrics
    after = training.forward(DATA, "cross_entropy").result()
    return metrics, [list(out["logprobs"].data) for out in after.loss_fn_outputs]


def test_a_run_that_got_bad_input_steps_exactly_like_its_twin(real_client: tinker.ServiceClient) -> None:
    twin = _train(real_client, with_bad_input=False)
    poked = _train(real_client, with_bad_input=True)
    assert all(math.isfinite(v) for row in poked[1] for v in row)
    assert poked == twin
