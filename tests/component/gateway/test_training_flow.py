"""P1/P2 flows through the real tinker SDK against a gateway running REAL trainer processes.

One training run is shared by the module (each trainer process costs seconds to boot on 2 cores);
the tests run in file order on it.
"""

from __future__ import annotations

import math

import pytest
import tinker
from tinker import types

from tests.component.gateway.conftest import TINY
from tests.support.sdk import GatewayProc

pytestmark = pytest.mark.slow


def datum(n: int = 6) -> types.Datum:
    tokens = list(range(1, n + 1))
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (n - 1)})


def test_get_info_names_base_model_and_a_loadable_tokenizer_dir(training: tinker.TrainingClient) -> None:
    info = training.get_info()
    assert info.model_data.model_name == TINY
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(info.model_data.tokenizer_id).encode("hi")


def test_chunked_forward_backward_then_optim_step_complete_in_order(training: tinker.TrainingClient) -> None:
    batch = [datum(6), datum(4), datum(5), datum(3), datum(7)]  # chunk length 2 → 3 chunks, first sent last
    fb = training.forward_backward(batch, "cross_entropy")
    opt = training.optim_step(types.AdamParams(learning_rate=1e-2))
    out = fb.result()
    assert [len(o["logprobs"].data) for o in out.loss_fn_outputs] == [5, 3, 4, 2, 6]
    assert out.metrics["loss:sum"] > 0
    assert opt.result().metrics is not None
    after = training.forward(batch, "cross_entropy").result()
    assert after.metrics["loss:sum"] < out.metrics["loss:sum"]  # the step was applied, in order


def test_ephemeral_sampler_samples_and_computes_logprobs(training: tinker.TrainingClient) -> None:
    sampler = training.save_weights_and_get_sampling_client()
    prompt = types.ModelInput.from_ints([1, 2, 3, 4])
    result = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=3, stop=[])).result()
    assert len(result.sequences) == 2 and all(len(s.tokens) == 3 for s in result.sequences)
    assert all(s.logprobs is not None and len(s.logprobs) == 3 for s in result.sequences)
    logprobs = sampler.compute_logprobs(prompt).result()
    assert logprobs[0] is None and all(isinstance(v, float) and not math.isnan(v) for v in logprobs[1:])


def test_forward_backward_custom_reports_the_custom_loss(training: tinker.TrainingClient) -> None:
    import torch

    def loss_fn(data: list[types.Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = sum((-lp).sum() for lp in logprobs)
        return loss, {"custom:sum": float(loss)}

    out = training.forward_backward_custom([datum(), datum(4)], loss_fn).result()
    assert out.metrics["loss:sum"] > 0
    training.optim_step(types.AdamParams()).result()


def test_named_sampler_weights_are_served_by_the_live_trainer(training: tinker.TrainingClient,
                                                              real_client: tinker.ServiceClient,
                                                              real_gateway: GatewayProc) -> None:
    processes = len(real_gateway.trainer_pids())
    path = training.save_weights_for_sampler("final").result().path
    assert path == f"tinker://{training.model_id}/sampler_weights/final"
    sampler = real_client.create_sampling_client(model_path=path)
    assert sampler.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2)).result()
    assert len(real_gateway.trainer_pids()) == processes  # no new process for a live run's weights


def test_save_state_and_resume_with_optimizer(training: tinker.TrainingClient,
                                              real_client: tinker.ServiceClient) -> None:
    path = training.save_state("step1").result().path
    assert path == f"tinker://{training.model_id}/weights/step1"
    before = training.forward([datum()], "cross_entropy").result().metrics["loss:sum"]
    resumed = real_client.create_training_client_from_state_with_optimizer(path).result()
    assert resumed.get_info().model_data.model_name == TINY
    again = resumed.forward([datum()], "cross_entropy").result().metrics["loss:sum"]
    assert again == pytest.approx(before, rel=1e-4)  # a saved state reloads to identical logprobs


def test_rest_reads_runs_and_deletes_checkpoints(training: tinker.TrainingClient, real_gateway: GatewayProc) -> None:
    rest = tinker.RestClient(base_url=real_gateway.url, api_key="tml-local")
    doomed = training.save_state("doomed").result().path
    run = rest.get_training_run_by_tinker_path(doomed).result()
    assert run.user_metadata == {"renderer_name": "role_colon"} and run.base_model == TINY
    ids = {c.checkpoint_id for c in rest.list_checkpoints(training.model_id).result().checkpoints}
    assert {"weights/step1", "weights/doomed", "sampler_weights/final"} <= ids
    rest.delete_checkpoint_from_tinker_path(doomed).result()
    ids = {c.checkpoint_id for c in rest.list_checkpoints(training.model_id).result().checkpoints}
    assert "weights/doomed" not in ids
    info = rest.get_weights_info_by_tinker_path(f"tinker://{training.model_id}/weights/step1").result()
    assert info.base_model == TINY and info.lora_rank == 8
    assert any(r.training_run_id == training.model_id for r in rest.list_training_runs().result().training_runs)


def test_base_model_sampling_starts_a_shared_sampler(real_client: tinker.ServiceClient,
                                                     real_gateway: GatewayProc) -> None:
    first = real_client.create_sampling_client(base_model=TINY)
    out = first.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2)).result()
    assert len(out.sequences[0].tokens) <= 2
    processes = len(real_gateway.trainer_pids())
    second = real_client.create_sampling_client(base_model=TINY)
    assert second.sample(types.ModelInput.from_ints([3]), 1, types.SamplingParams(max_tokens=1)).result()
    assert len(real_gateway.trainer_pids()) == processes  # shared by the tenant's clients of the same weights


def test_capabilities_list_the_configured_models(real_gateway: GatewayProc) -> None:
    with real_gateway.http() as http:
        models = http.get("/api/v1/get_server_capabilities").json()["supported_models"]
    assert TINY in [m["model_name"] for m in models]
