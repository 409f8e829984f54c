"""P1/P2 flows through the real tinker SDK against a gateway with (fake) trainer processes."""

from __future__ import annotations

import tinker
from tinker import types

from tests.component.gateway.conftest import TINY
from tests.support.sdk import GatewayProc


def datum(n: int = 6) -> types.Datum:
    tokens = list(range(1, n + 1))
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (n - 1)})


def test_chunked_forward_backward_then_optim_step_complete_in_order(service_client: tinker.ServiceClient) -> None:
    training = service_client.create_lora_training_client(base_model=TINY, rank=8).result()
    batch = [datum(6), datum(4), datum(5), datum(3), datum(7)]  # chunk length 2 → 3 chunks, first sent last
    fb = training.forward_backward(batch, "cross_entropy")
    opt = training.optim_step(types.AdamParams(learning_rate=1e-3))
    out = fb.result()
    assert [len(o["logprobs"].data) for o in out.loss_fn_outputs] == [5, 3, 4, 2, 6]
    assert "loss:sum" in out.metrics
    assert opt.result().metrics is not None
    fwd = training.forward([datum()], "cross_entropy").result()
    assert len(fwd.loss_fn_outputs) == 1


def test_get_info_names_base_model_and_a_loadable_tokenizer_dir(service_client: tinker.ServiceClient) -> None:
    training = service_client.create_lora_training_client(base_model=TINY, rank=8).result()
    info = training.get_info()
    assert info.model_data.model_name == TINY
    assert info.model_data.tokenizer_id.endswith("tinkerkube--tiny-qwen3")


def test_save_state_and_resume_with_optimizer(service_client: tinker.ServiceClient) -> None:
    training = service_client.create_lora_training_client(base_model=TINY, rank=8,
                                                          user_metadata={"renderer_name": "role_colon"}).result()
    training.forward_backward([datum()], "cross_entropy").result()
    training.optim_step(types.AdamParams()).result()
    path = training.save_state("step1").result().path
    assert path == f"tinker://{training.model_id}/weights/step1"
    resumed = service_client.create_training_client_from_state_with_optimizer(path)
    assert resumed.get_info().model_data.model_name == TINY
    assert resumed.forward_backward([datum()], "cross_entropy").result().metrics["loss:sum"] > 0
    rest = service_client.create_rest_client()
    run = rest.get_training_run_by_tinker_path(path).result()
    assert run.user_metadata == {"renderer_name": "role_colon"}


def test_ephemeral_sampler_samples_and_computes_logprobs(service_client: tinker.ServiceClient) -> None:
    training = service_client.create_lora_training_client(base_model=TINY, rank=8).result()
    sampler = training.save_weights_and_get_sampling_client()
    prompt = types.ModelInput.from_ints([1, 2, 3, 4])
    result = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=3)).result()
    assert len(result.sequences) == 2 and all(len(s.tokens) == 3 for s in result.sequences)
    assert all(s.logprobs is not None for s in result.sequences)
    logprobs = sampler.compute_logprobs(prompt).result()
    assert logprobs[0] is None and all(isinstance(v, float) for v in logprobs[1:])


def test_named_sampler_weights_and_base_model_sampling(service_client: tinker.ServiceClient) -> None:
    training = service_client.create_lora_training_client(base_model=TINY, rank=8).result()
    path = training.save_weights_for_sampler("final").result().path
    assert path.endswith("/sampler_weights/final")
    from_path = service_client.create_sampling_client(model_path=path)
    assert from_path.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2)).result()
    base = service_client.create_sampling_client(base_model=TINY)
    assert base.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2)).result()


def test_forward_backward_custom_reports_the_custom_loss(service_client: tinker.ServiceClient) -> None:
    import torch

    training = service_client.create_lora_training_client(base_model=TINY, rank=8).result()

    def loss_fn(data: list[types.Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = sum((-lp).sum() for lp in logprobs)
        return loss, {"custom:sum": float(loss)}

    out = training.forward_backward_custom([datum(), datum(4)], loss_fn).result()
    assert "loss:sum" in out.metrics


def test_rest_lists_and_deletes_checkpoints(service_client: tinker.ServiceClient) -> None:
    training = service_client.create_lora_training_client(base_model=TINY, rank=8).result()
    path = training.save_state("keep").result().path
    doomed = training.save_state("doomed").result().path
    rest = service_client.create_rest_client()
    listed = rest.list_checkpoints(training.model_id).result()
    assert {c.checkpoint_id for c in listed.checkpoints} == {"weights/keep", "weights/doomed"}
    rest.delete_checkpoint_from_tinker_path(doomed).result()
    listed = rest.list_checkpoints(training.model_id).result()
    assert [c.tinker_path for c in listed.checkpoints] == [path]
    info = rest.get_weights_info_by_tinker_path(path).result()
    assert info.base_model == TINY and info.lora_rank == 8
    assert any(r.training_run_id == training.model_id for r in rest.list_training_runs().result().training_runs)


def test_capabilities_list_the_configured_models(shared_gateway: GatewayProc) -> None:
    with shared_gateway.http() as http:
        models = http.get("/api/v1/get_server_capabilities").json()["supported_models"]
    assert TINY in [m["model_name"] for m in models]
