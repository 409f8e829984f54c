"""P1 flows through the real tinker SDK: create model, forward_backward (chunked), optim, saves."""

from __future__ import annotations

import tinker
from tinker import types

from tests.component.gateway.conftest import TINY


def _datum(n: int = 6) -> types.Datum:
    tokens = list(range(1, n + 1))
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (n - 1)})


def test_forward_backward_then_optim_step_complete_in_order(service_client: tinker.ServiceClient) -> None:
    training = service_client.create_lora_training_client(base_model=TINY, rank=8).result()
    fb = training.forward_backward([_datum(), _datum(4)], "cross_entropy")
    opt = training.optim_step(types.AdamParams(learning_rate=1e-3))
    out = fb.result()
    assert len(out.loss_fn_outputs) == 2
    assert len(out.loss_fn_outputs[0]["logprobs"].data) == 5
    assert "loss:sum" in out.metrics
    assert opt.result().metrics is not None
