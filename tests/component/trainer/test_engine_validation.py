"""Bad input fails in prepare() with a user-category OpError and leaves every piece of state as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

from tests.component.trainer.engine_fixtures import (
    ce_datums,
    engine_config,
    fb_body,
    new_engine,
    optim_step,
    prepare_json,
    prepare_sample,
    rl_datums,
    run_fb,
)
from tinkerkube_contract.pod_api import CONTENT_PROTOBUF, OpKind
from tinkerkube_trainer.engine_api import OpError


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path, tiny_model_dir: Path):
    eng = new_engine(engine_config(tmp_path_factory.mktemp("validation"), model_cache_dir))
    run_fb(eng, ce_datums(2, seed=1))
    optim_step(eng)
    run_fb(eng, ce_datums(2, seed=2))  # leave accumulated gradients pending
    return eng


def _datum(tokens: list[int], **inputs: list) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)


def _image_request() -> bytes:
    msg = pb.ForwardBackwardRequest.FromString(fb_body(ce_datums(1)))
    msg.data[0].model_input.add().image.data = b"png"
    return msg.SerializeToString()


BAD_FORWARD_BACKWARD = {
    "target_length_mismatch": (fb_body([_datum([5, 6, 7], target_tokens=[6, 7])]), "bad_shape"),
    "unknown_loss": (fb_body(ce_datums(2), "mystery"), "unknown_loss"),
    "custom_loss": (fb_body(ce_datums(2), "custom"), "unknown_custom_loss"),
    "token_out_of_vocab": (fb_body([_datum([5, 99999], target_tokens=[6, 7])]), "token_out_of_range"),
    "target_out_of_vocab": (fb_body([_datum([5, 6], target_tokens=[6, 99999])]), "token_out_of_range"),
    "negative_token": (fb_body([_datum([5, -1], target_tokens=[6, 7])]), "token_out_of_range"),
    "missing_advantages": (fb_body([_datum([5, 6], target_tokens=[6, 7], logprobs=[-1.0, -1.0])], "ppo"),
                           "missing_loss_input"),
    "missing_targets": (fb_body([_datum([5, 6], weights=[1.0, 1.0])]), "missing_loss_input"),
    "empty_data": (fb_body([]), "empty_data"),
    "empty_datum": (fb_body([_datum([], target_tokens=[])]), "empty_data"),
    "two_dim_rl_input": (fb_body([_datum([5, 6], target_tokens=[[6, 1], [7, 1]], logprobs=[-1.0, -1.0],
                                         advantages=[1.0, 1.0])], "importance_sampling"), "bad_shape"),
    "topk_weights_mismatch": (fb_body([_datum([5, 6], target_tokens=[[6, 1], [7, 1]], weights=[1.0, 1.0])]),
                              "bad_shape"),
    "topk_k_differs": (fb_body([_datum([5, 6], target_tokens=[[6, 1], [7, 1]]),
                                _datum([5, 6], target_tokens=[[6, 1, 2], [7, 1, 2]])]), "bad_shape"),
    "weights_on_some_datums_only": (fb_body([_datum([5, 6], target_tokens=[6, 7], weights=[1.0, 1.0]),
                                             _datum([5, 6], target_tokens=[6, 7])]), "bad_shape"),
    "nan_advantage": (fb_body([_datum([5, 6], target_tokens=[6, 7], logprobs=[-1.0, -1.0],
                                      advantages=[float("nan"), 1.0])], "importance_sampling"), "bad_value"),
    "clip_order": (fb_body(rl_datums(1), "ppo", config={"clip_low_threshold": 1.3}), "invalid_loss_config"),
    "nan_dro_beta": (fb_body(rl_datums(1), "dro", config={"beta": float("nan")}), "invalid_loss_config"),
    "infinite_clip": (fb_body(rl_datums(1), "ppo", config={"clip_high_threshold": float("inf")}),
                      "invalid_loss_config"),
    "image_chunk": (_image_request(), "unsupported_chunk"),
    "garbage": (b"\x08\xff\xff\xff\xff\xff", "malformed_protobuf"),
}


def _state(engine) -> tuple:
    return engine.adapter_weights(), engine.accumulated_grads(), engine.optimizer.state_dict()["steps"]


def _assert_unchanged(engine, before: tuple) -> None:
    weights, grads, steps = _state(engine)
    assert steps == before[2]
    for now, then in ((weights, before[0]), (grads, before[1])):
        assert now.keys() == then.keys() and now
        assert all((now[k] == then[k]).all() for k in now)


@pytest.mark.parametrize("case", sorted(BAD_FORWARD_BACKWARD))
def test_bad_forward_backward_is_a_user_error_and_changes_nothing(engine, case: str) -> None:
    body, code = BAD_FORWARD_BACKWARD[case]
    before = _state(engine)
    with pytest.raises(OpError) as err:
        engine.prepare(OpKind.FORWARD_BACKWARD, body, CONTENT_PROTOBUF)
    assert (err.value.code, err.value.category) == (code, "user")
    _assert_unchanged(engine, before)


@pytest.mark.parametrize(("kind", "payload"), [
    (OpKind.OPTIM_STEP, {"adam_params": {"learning_rate": -1}}),
    (OpKind.OPTIM_STEP, {"adam_params": {"beta1": 1.5}}),
    (OpKind.SAVE_STATE, {}),
    (OpKind.SAVE_SAMPLER_WEIGHTS, {}),
    (OpKind.SAVE_SAMPLER_WEIGHTS, {"name": "../x"}),
    (OpKind.LOAD_STATE, {"path": "tinker://nobody:train:0/weights/none"}),
])
def test_bad_json_ops_are_user_errors_and_change_nothing(engine, kind: OpKind, payload: dict) -> None:
    before = _state(engine)
    with pytest.raises(OpError) as err:
        prepare_json(engine, kind, payload)
    assert err.value.category == "user"
    _assert_unchanged(engine, before)


@pytest.mark.parametrize(("prompt", "snapshot", "params", "code"), [
    ([5, 99999], None, {}, "token_out_of_range"),
    ([5, 6], "sess:sample:404", {}, "unknown_snapshot"),
    ([5, 6], None, {"stop": [99999]}, "token_out_of_range"),
    ([5, 6], None, {"top_p": 1.5}, "invalid_sample_request"),
    ([5, 6], None, {"max_tokens": 2**31 - 1}, "too_many_tokens"),
    ([5, 6], None, {"num_samples": 10_000, "max_tokens": 1000}, "too_many_tokens"),
])
def test_bad_samples_are_user_errors(engine, prompt, snapshot, params, code) -> None:
    with pytest.raises(OpError) as err:
        prepare_sample(engine, prompt, snapshot, **params)
    assert (err.value.code, err.value.category) == (code, "user")


def test_malformed_op_body_is_a_user_error(engine) -> None:
    with pytest.raises(OpError) as err:
        engine.prepare(OpKind.OPTIM_STEP, b"{not json", "application/json")
    assert err.value.category == "user"


def test_sample_only_trainer_refuses_training_ops(tmp_path: Path, model_cache_dir: Path) -> None:
    sampler = new_engine(engine_config(tmp_path, model_cache_dir, mode="sample"))
    for kind, body in [(OpKind.FORWARD_BACKWARD, fb_body(ce_datums(1))), (OpKind.SAVE_STATE, b'{"name": "a"}')]:
        with pytest.raises(OpError) as err:
            sampler.prepare(kind, body, CONTENT_PROTOBUF)
        assert (err.value.code, err.value.category) == ("sample_only", "user")
