"""The real `tinker` SDK against a deployed gateway: a short supervised loop, sampling, a checkpoint.

Run by tests/kind/e2e.sh with TINKER_BASE_URL and TINKER_API_KEY pointing at the cluster. Standalone:
    TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-local python tests/kind/sdk_smoke.py
Uses token ids directly (no tokenizer download), on the built-in tiny model baked into the trainer image.
Exits non-zero, with the reason, on the first thing that is wrong.
"""

from __future__ import annotations

import math
import os
import sys
import time

import tinker
from tinker import types

BASE_MODEL = os.environ.get("E2E_BASE_MODEL", "tinkerkube/tiny-qwen3")
STEPS = int(os.environ.get("E2E_STEPS", "4"))
TIMEOUT = float(os.environ.get("E2E_FUTURE_TIMEOUT", "900"))  # the first op waits for the trainer pod


def _datum(tokens: list[int]) -> types.Datum:
    """Next-token prediction over the sequence: inputs tokens[:-1], targets tokens[1:], every token weighted."""
    inputs, targets = tokens[:-1], tokens[1:]
    return types.Datum(
        model_input=types.ModelInput.from_ints(inputs),
        loss_fn_inputs={"target_tokens": targets, "weights": [1.0] * len(targets)},
    )


def _batch() -> list[types.Datum]:
    return [_datum([(7 * i + j) % 200 + 10 for j in range(12)]) for i in range(4)]


def _loss(output: types.ForwardBackwardOutput) -> float:
    return float(output.metrics["loss:sum"])


def train(training_client: tinker.TrainingClient) -> list[float]:
    losses = []
    batch = _batch()
    for step in range(STEPS):
        fb = training_client.forward_backward(batch, "cross_entropy")
        opt = training_client.optim_step(types.AdamParams(learning_rate=5e-3))
        loss = _loss(fb.result(timeout=TIMEOUT))
        opt.result(timeout=TIMEOUT)
        print(f"step {step}: loss:sum={loss:.4f}", flush=True)
        if not math.isfinite(loss):
            raise AssertionError(f"loss is not finite at step {step}: {loss}")
        losses.append(loss)
    if not losses[-1] < losses[0]:
        raise AssertionError(f"training on one fixed batch did not lower the loss: {losses}")
    return losses


def sample(training_client: tinker.TrainingClient) -> None:
    sampler = training_client.save_weights_and_get_sampling_client(name="e2e-sampler").result()
    response = sampler.sample(
        prompt=types.ModelInput.from_ints([10, 17, 24, 31]),
        num_samples=2,
        sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0, seed=0),
    ).result(timeout=TIMEOUT)
    if len(response.sequences) != 2 or not all(seq.tokens for seq in response.sequences):
        raise AssertionError(f"expected 2 non-empty samples, got {response.sequences}")
    print(f"sampled: {[seq.tokens for seq in response.sequences]}", flush=True)


def checkpoint(service: tinker.ServiceClient, training_client: tinker.TrainingClient) -> str:
    """save_state, then a new training run restored from it (in a cluster: a second TrainingSession)."""
    path = training_client.save_state("e2e-state").result(timeout=TIMEOUT).path
    if not path.startswith("tinker://"):
        raise AssertionError(f"save_state returned {path!r}, not a tinker:// path")
    expected = _loss(training_client.forward_backward(_batch(), "cross_entropy").result(timeout=TIMEOUT))
    restored = service.create_training_client_from_state_with_optimizer(path).result()
    loss = _loss(restored.forward_backward(_batch(), "cross_entropy").result(timeout=TIMEOUT))
    if not abs(loss - expected) <= 1e-3 * abs(expected):
        raise AssertionError(f"the restored run computes loss {loss}, the saved one {expected}")
    print(f"checkpoint saved and restored into a new run: {path} (loss:sum={loss:.4f})", flush=True)
    return path


def main() -> int:
    start = time.monotonic()
    service = tinker.ServiceClient()
    capabilities = service.get_server_capabilities()
    print(f"server models: {[m.model_name for m in capabilities.supported_models]}", flush=True)
    training_client = service.create_lora_training_client(base_model=BASE_MODEL, rank=8).result()
    train(training_client)
    sample(training_client)
    checkpoint(service, training_client)
    print(f"SDK smoke passed in {time.monotonic() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
