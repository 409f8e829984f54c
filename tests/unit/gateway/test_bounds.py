"""Bounds on user input, as pure functions: JSON depth, finite numbers, integer ranges, and the address
(model_id, seq_id) read back from a body too broken to parse."""

from __future__ import annotations

import json
import math

import pytest
import zstandard
from tinker.proto import tinker_public_pb2 as pb

from tests.support.gateway_raw import fwdbwd_body
from tinkerkube_contract import pod_api
from tinkerkube_gateway import bounds, wire
from tinkerkube_gateway.errors import InvalidRequest
from tinkerkube_gateway.schemas import (
    CreateModelRequest,
    OptimStepRequest,
    SampleRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
    TtlRequest,
)
from tinkerkube_gateway.services.registry import iso


def test_json_deeper_than_the_limit_is_refused_before_any_parser_recurses() -> None:
    with pytest.raises(InvalidRequest, match="deeper than 64"):
        wire.load_json(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert wire.load_json(b'{"a": ' + b"[" * 63 + b"]" * 63 + b"}")  # 64 levels with the object
    with pytest.raises(InvalidRequest, match="deeper"):
        bounds.check_json_depth(b"[" * 65 + b"]" * 65)


def test_brackets_inside_strings_do_not_nest() -> None:
    text = json.dumps({"a": "[" * 1000, "b": 'quote \\" then [[[[ ' * 50, "c": [1, 2, {"d": "]]]"}]})
    assert wire.load_json(text.encode())["c"][2]["d"] == "]]]"


@pytest.mark.parametrize("body", [b"[1, 2]", b"not json", b"\xff\xfe", b'"a string"'])
def test_anything_but_a_json_object_is_a_400(body: bytes) -> None:
    with pytest.raises(InvalidRequest):
        wire.load_json(body)


def test_free_form_maps_hold_only_finite_numbers_and_the_culprit_is_named() -> None:
    assert bounds.finite_tree({"a": [1.5, {"b": "nan"}]}) == {"a": [1.5, {"b": "nan"}]}
    with pytest.raises(ValueError, match=r"value\.a\[1\]\.b must be a finite number"):
        bounds.finite_tree({"a": [1.5, {"b": math.nan}]})


SEQ = {"model_id": "s:train:0", "seq_id": 3}


@pytest.mark.parametrize(("model", "body", "field"), [
    (OptimStepRequest, {**SEQ, "seq_id": 2**63}, "seq_id"),
    (OptimStepRequest, {**SEQ, "seq_id": 0}, "seq_id"),
    (OptimStepRequest, {**SEQ, "adam_params": {"learning_rate": math.inf}}, "learning_rate"),
    (OptimStepRequest, {**SEQ, "adam_params": {"learning_rate": -1e-4}}, "learning_rate"),
    (OptimStepRequest, {**SEQ, "adam_params": {"beta2": math.nan}}, "beta2"),
    (OptimStepRequest, {**SEQ, "adam_params": {"weight_decay": 1e400}}, "weight_decay"),  # parses as inf
    (SaveWeightsRequest, {**SEQ, "ttl_seconds": -5}, "ttl_seconds"),
    (SaveWeightsRequest, {**SEQ, "ttl_seconds": 10**30}, "ttl_seconds"),
    (SaveWeightsRequest, {**SEQ, "user_metadata": {"x": math.nan}}, "user_metadata"),
    (SaveWeightsForSamplerRequest, {**SEQ, "ttl_seconds": -1}, "ttl_seconds"),
    (SaveWeightsForSamplerRequest, {**SEQ, "sampling_session_seq_id": 2**40}, "sampling_session_seq_id"),
    (TtlRequest, {"ttl_seconds": 10**12}, "ttl_seconds"),
    (CreateModelRequest, {"session_id": "s", "model_seq_id": -1, "base_model": "b"}, "model_seq_id"),
    (CreateModelRequest, {"session_id": "s", "model_seq_id": 0, "base_model": "b", "lora_config": {"seed": 2**64}},
     "seed"),
    (CreateModelRequest, {"session_id": "s", "model_seq_id": 0, "base_model": "b",
                          "optimizer_config": {"lr": math.inf}}, "optimizer_config"),
])
def test_out_of_bounds_fields_are_400s_naming_the_field(model: type, body: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequest, match=field):
        wire.parse_json(json.dumps(body).encode(), model)


PROMPT = {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}


@pytest.mark.parametrize(("params", "field"), [
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": math.inf}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 2**40}, "top_k"),
    ({"max_tokens": 2**40}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"seed": 2**64}, "seed"),
    ({"stop": [1, -2]}, "stop"),
])
def test_sampling_params_out_of_bounds_are_400s(params: dict[str, object], field: str) -> None:
    body = {"prompt": PROMPT, "sampling_params": params, "sampling_session_id": "s:sample:0", "seq_id": 0}
    with pytest.raises(InvalidRequest, match=field):
        wire.parse_json(json.dumps(body).encode(), SampleRequest)


def test_sdk_shaped_bodies_within_bounds_parse() -> None:
    body = {"prompt": PROMPT, "sampling_session_id": "s:sample:0", "seq_id": 7, "num_samples": 4,
            "sampling_params": {"max_tokens": 16, "temperature": 0.0, "top_k": -1, "top_p": 1.0, "seed": -3,
                                "stop": ["\n"]}}
    assert wire.parse_json(json.dumps(body).encode(), SampleRequest).sampling_params.max_tokens == 16
    step = wire.parse_json(json.dumps({**SEQ, "adam_params": {"learning_rate": 0.0}}).encode(), OptimStepRequest)
    assert step.adam_params is not None and step.adam_params.learning_rate == 0.0


def test_adam_params_never_reach_the_trainer_as_null() -> None:
    with pytest.raises(ValueError, match="finite"):
        pod_api.AdamParams(learning_rate=math.inf)
    assert json.loads(pod_api.OptimStepOp().model_dump_json())["adam_params"]["learning_rate"] == 1e-4


@pytest.mark.parametrize("body", [
    b'{"model_id": "s:train:0", "seq_id": 7, "adam_params": {"learn',  # cut short
    b'{"type": "optim_step", "seq_id": 7, "model_id": "s:train:0", "x": ' + b"[" * 1000,  # any key order
    b'  {"model_id" : "s:train:0","model_seq_id": 1,  "seq_id":7}',
])
def test_a_broken_json_body_still_names_its_op(body: bytes) -> None:
    assert wire.recover_address(body) == wire.OpAddress("s:train:0", 7)


def test_a_broken_protobuf_body_still_names_its_op_even_compressed_or_cut() -> None:
    body = fwdbwd_body("s:train:0", 9, n=50_000)
    assert wire.recover_address(body[:1000]) == wire.OpAddress("s:train:0", 9)
    assert wire.recover_address(body[:-3]) == wire.OpAddress("s:train:0", 9)
    packed = zstandard.ZstdCompressor().compress(body)
    assert wire.recover_address(packed, "zstd") == wire.OpAddress("s:train:0", 9)
    assert wire.recover_address(packed[: wire.ADDRESS_PREFIX_BYTES], "zstd") == wire.OpAddress("s:train:0", 9)


@pytest.mark.parametrize(("body", "encoding"), [
    (b'{"model_id": "s:train:0", "seq_id": 9223372036854775808}', None),  # no such seq_id
    (b'{"model_id": "s:train:0", "seq_id": 0}', None),
    (b'{"model_id": "s:train:0", "seq_id": 3.5}', None),
    (b'{"session_id": "s", "model_seq_id": 3}', None),  # create_model: no training seq_id at all
    (b'{"model_id": "s:train:0"}', None),
    (fwdbwd_body("s:train:0", 0), None),
    (b"\xff\xff\xff\xff", None),
    (b"", None),
    (b"not zstd", "zstd"),
])
def test_a_body_that_names_no_op_yields_no_address(body: bytes, encoding: str | None) -> None:
    assert wire.recover_address(body, encoding) is None


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_fn_config_number_is_refused_in_either_map(legacy: bool, value: float) -> None:
    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(fwdbwd_body("s:train:0", 4))
    if legacy:
        msg.loss_fn_config["clip_low_threshold"] = value
    else:
        msg.loss_fn_config_v2["beta"].number = value
    msg.loss_fn_config_v2["note"].text = "text values are the trainer's to judge"
    with pytest.raises(InvalidRequest, match="loss_fn_config"):
        wire.check_forward_backward(msg.SerializeToString(), None, 10**6)


def test_an_expiry_stored_past_year_9999_still_lists() -> None:
    assert iso(1e30).startswith("9999-12-31") and iso(0).startswith("1970-01-01")
