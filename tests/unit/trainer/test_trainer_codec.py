"""Wire conversion against the SDK's own encoder (requests) and decoder (results)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tinker import types
from tinker.proto import tinker_public_pb2 as pb
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from tinkerkube_contract.pod_api import MAX_PROMPT_ALT_TOKEN_CELLS, MAX_PROMPT_ALT_TOKENS_K
from tinkerkube_trainer import codec
from tinkerkube_trainer.engine_api import OpError
from tinkerkube_trainer.sample_checks import prompt_alt_tokens_problem


def _request(data: list[types.Datum], loss_fn: str = "ppo", config: dict | None = None, forward_only=False) -> bytes:
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id="s:train:0",
        seq_id=7,
    )
    msg = forward_backward_request_to_proto(req)
    msg.forward_only = forward_only
    return msg.SerializeToString()


def test_sdk_request_decodes_to_tokens_inputs_and_config() -> None:
    datum = types.Datum(
        model_input=types.ModelInput(
            chunks=[types.EncodedTextChunk(tokens=[1, 2]), types.EncodedTextChunk(tokens=[300])]
        ),
        loss_fn_inputs={"target_tokens": [2, 300, 4], "advantages": [0.5, -1.0, 2.0], "logprobs": [-1.0, -2.0, -3.0]},
    )
    payload = codec.decode_forward_backward(_request([datum], config={"clip_low_threshold": 0.7, "mode": "x"},
                                                     forward_only=True))
    assert (payload.model_id, payload.seq_id, payload.loss_fn, payload.forward_only) == ("s:train:0", 7, "ppo", True)
    assert payload.config == {"clip_low_threshold": 0.7, "mode": "x"}
    assert payload.legacy_config == {"clip_low_threshold": 0.7}
    (d,) = payload.datums
    assert d.tokens.tolist() == [1, 2, 300]
    assert d.inputs["target_tokens"].dtype == np.int64 and d.inputs["target_tokens"].tolist() == [2, 300, 4]
    assert d.inputs["advantages"].dtype == np.float32 and d.inputs["advantages"].tolist() == [0.5, -1.0, 2.0]


def test_sparse_csr_tensor_decodes_to_dense_with_zero_fill() -> None:
    msg = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3, 4])
    msg.sparse_csr.values = np.array([1.5, 2.5, 3.5], dtype=np.float32).tobytes()
    msg.sparse_csr.crow_indices = np.array([0, 2, 2, 3], dtype=np.int64).tobytes()
    msg.sparse_csr.col_indices = np.array([0, 3, 1], dtype=np.int64).tobytes()
    assert codec.decode_tensor(msg, "w").tolist() == [[1.5, 0, 0, 2.5], [0, 0, 0, 0], [0, 3.5, 0, 0]]


def test_tensor_without_shape_is_one_dimensional_and_bad_shapes_are_refused() -> None:
    msg = pb.Tensor(dtype=pb.DTYPE_INT64, dense=np.arange(6, dtype=np.int64).tobytes())
    assert codec.decode_tensor(msg, "t").shape == (6,)
    msg.shape.extend([4, 2])
    with pytest.raises(OpError, match="shape"):
        codec.decode_tensor(msg, "t")


def test_non_text_chunk_is_a_user_error() -> None:
    msg = pb.ForwardBackwardRequest(loss_fn="cross_entropy")
    msg.data.add().model_input.add().image.data = b"\x89PNG"
    with pytest.raises(OpError) as err:
        codec.decode_forward_backward(msg.SerializeToString())
    assert err.value.code == "unsupported_chunk" and err.value.category == "user"


def test_an_unresolved_image_asset_pointer_reaches_no_fetch() -> None:
    """The gateway turns pointers into image bytes; one that got through anyway is refused, never fetched."""
    pointer = {"type": "image_asset_pointer", "format": "png", "location": "file:///etc/passwd", "expected_tokens": 4}
    request = {"num_samples": 1, "sampling_params": {"max_tokens": 1},
               "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}, pointer]}}
    with pytest.raises(OpError, match="unresolved image_asset_pointer") as err:
        codec.decode_sample_request(request)
    assert err.value.code == "unsupported_chunk" and err.value.category == "user"


def test_malformed_protobuf_is_a_user_error() -> None:
    with pytest.raises(OpError) as err:
        codec.decode_forward_backward(b"\xff\xff\xff garbage")
    assert err.value.code == "malformed_protobuf"


def test_forward_backward_output_round_trips_through_the_sdk_decoder() -> None:
    outs = [{"logprobs": np.array([-1.0, -2.0], np.float32), "elementwise_loss": np.array([1.0, 2.0], np.float32)},
            {"logprobs": np.array([-0.5], np.float32), "elementwise_loss": np.array([0.5], np.float32)},
            {"logprobs": np.array([-3.0, -4.0, -5.0], np.float32), "elementwise_loss": np.zeros(3, np.float32)}]
    body = codec.encode_forward_backward_output(outs, {"loss:sum": 3.5, "num_tokens:sum": 6})
    decoded = deserialize_forward_backward_output(body)
    assert decoded.metrics == {"loss:sum": 3.5, "num_tokens:sum": 6.0}
    assert len(decoded.loss_fn_outputs) == 3
    for got, want in zip(decoded.loss_fn_outputs, outs, strict=True):
        assert got["logprobs"].tolist() == want["logprobs"].tolist()
        assert got["logprobs"].shape == [len(want["logprobs"])]
        assert got["elementwise_loss"].tolist() == want["elementwise_loss"].tolist()
    raw = pb.ForwardBackwardOutput.FromString(body)
    assert np.frombuffer(raw.loss_fn_outputs[0].fields["logprobs"].offsets, np.int64).tolist() == [0, 8, 12, 24]


@pytest.mark.parametrize("metrics", [{"loss": 1.0}, {"loss:sum": 1.0, "a:b:c": 2.0}, {"other:sum": 1.0}])
def test_metric_keys_must_be_name_colon_reduction_with_loss_sum(metrics: dict) -> None:
    with pytest.raises(ValueError):
        codec.encode_forward_backward_output([], metrics)


def _sample_json(stop=None, **extra) -> dict:
    params = types.SamplingParams(max_tokens=extra.pop("max_tokens", None), stop=stop, seed=extra.pop("seed", None))
    req = types.SampleRequest(prompt=types.ModelInput.from_ints([4, 5, 6]), sampling_params=params, **extra)
    return req.model_dump(mode="json", exclude_none=True)


@pytest.mark.parametrize(
    ("stop", "strings", "tokens"),
    [(None, None, None), ("\n", ("\n",), None), (["a", "b"], ("a", "b"), None), ([7, 8], None, (7, 8)), ([], (), ())],
)
def test_sample_request_stop_forms(stop, strings, tokens) -> None:
    params = codec.decode_sample_request(_sample_json(stop=stop))
    assert (params.stop_strings, params.stop_tokens) == (strings, tokens)


def test_sample_request_defaults_and_flags() -> None:
    params = codec.decode_sample_request(_sample_json(num_samples=3, prompt_logprobs=True, topk_prompt_logprobs=2,
                                                      prompt_logprobs_last_n=2, seed=11))
    assert params.prompt == (4, 5, 6) and params.num_samples == 3 and params.seed == 11
    assert params.max_tokens == codec.DEFAULT_MAX_TOKENS and params.temperature == 1.0 and params.top_k == -1
    assert params.prompt_logprobs and params.topk_prompt_logprobs == 2 and params.prompt_logprobs_last_n == 2


@pytest.mark.parametrize("change", [
    {"num_samples": 0},
    {"prompt_logprobs_last_n": 3},
    {"sampling_params": {"top_k": 0}},
    {"sampling_params": {"top_p": 0.0}},
    {"prompt": {"chunks": [{"type": "image", "data": "aGk=", "format": "png"}]}},
    {"prompt": {"chunks": []}},
    {"sampling_params": "nope"},
])
def test_bad_sample_requests_are_user_errors(change: dict) -> None:
    body = {**_sample_json(), **change}
    with pytest.raises(OpError) as err:
        codec.decode_sample_request(body)
    assert err.value.category == "user"


def test_sample_response_round_trips_through_the_sdk_decoder() -> None:
    result = codec.SampleResult(
        sequences=[codec.SampledSeq([1, 2, 3], [-0.1, -0.2, -0.3], stopped=True),
                   codec.SampledSeq([4], [-0.4], stopped=False)],
        prompt_logprobs=np.array([np.nan, -1.0, -2.0], np.float32),
        topk_ids=np.array([[0, 0], [5, 6], [7, 8]], np.int32),
        topk_logprobs=np.array([[codec.TOPK_PAD_LOGPROB] * 2, [-1, -2], [-3, -4]], np.float32),
    )
    decoded = deserialize_sample_response(codec.encode_sample_response(result))
    assert [s.stop_reason for s in decoded.sequences] == ["stop", "length"]
    assert [s.tokens for s in decoded.sequences] == [[1, 2, 3], [4]]
    assert decoded.sequences[0].logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert decoded.prompt_logprobs[0] is None or math.isnan(decoded.prompt_logprobs[0])
    assert decoded.prompt_logprobs[1:] == [-1.0, -2.0]
    assert decoded.topk_prompt_logprobs[0] is None
    assert decoded.topk_prompt_logprobs[2] == [(7, -3.0), (8, -4.0)]


def test_target_prompt_ids_decode_dense_and_sparse_with_minus_one_fill() -> None:
    dense = _sample_json(target_prompt_logprobs={"data": [5, -1, 7, 8], "dtype": "int64", "shape": [2, 2]})
    assert codec.decode_sample_request(dense).target_prompt_ids.tolist() == [[5, -1], [7, 8]]
    sparse = _sample_json(target_prompt_logprobs={"data": [9, 4], "dtype": "int64", "shape": [2, 3],
                                                  "sparse_crow_indices": [0, 1, 2], "sparse_col_indices": [2, 0]})
    assert codec.decode_sample_request(sparse).target_prompt_ids.tolist() == [[-1, -1, 9], [4, -1, -1]]
    with pytest.raises(OpError):
        codec.decode_sample_request(_sample_json(target_prompt_logprobs={"data": [1, 2, 3], "dtype": "int64",
                                                                         "shape": [3, 1]}))


def test_prompt_alt_tokens_k_decodes_within_its_bounds() -> None:
    assert codec.decode_sample_request(_sample_json()).prompt_alt_tokens_k == 0
    assert codec.decode_sample_request(_sample_json(prompt_alt_tokens_k=MAX_PROMPT_ALT_TOKENS_K)).prompt_alt_tokens_k \
        == MAX_PROMPT_ALT_TOKENS_K
    for k in (-1, MAX_PROMPT_ALT_TOKENS_K + 1):
        with pytest.raises(OpError, match="prompt_alt_tokens_k must be between 0 and") as err:
            codec.decode_sample_request(_sample_json(prompt_alt_tokens_k=k))
        assert (err.value.category, err.value.code) == ("user", "invalid_sample_request")


def test_prompt_alt_token_cells_are_capped() -> None:
    k = 8
    rows = MAX_PROMPT_ALT_TOKEN_CELLS // k  # a prompt of rows + 1 tokens: exactly the cap
    assert prompt_alt_tokens_problem(k, rows + 1) is None
    assert "at most 262144" in (prompt_alt_tokens_problem(k, rows + 2) or "")
    assert prompt_alt_tokens_problem(MAX_PROMPT_ALT_TOKENS_K, 1) is None  # one token: no rows, nothing to cap
    too_long = types.SampleRequest(prompt=types.ModelInput.from_ints([1] * (rows + 2)), prompt_alt_tokens_k=k,
                                   sampling_params=types.SamplingParams(max_tokens=1))
    with pytest.raises(OpError, match="draws") as err:
        codec.decode_sample_request(too_long.model_dump(mode="json", exclude_none=True))
    assert err.value.category == "user"


def test_prompt_alt_tokens_round_trip_through_the_sdk_decoder() -> None:
    tokens = np.array([[5, 5, 9], [2, 7, 7]], np.int64)
    logprobs = np.array([[-0.5, -0.5, -3.25], [-1.0, -2.0, -2.0]], np.float32)
    result = codec.SampleResult(sequences=[codec.SampledSeq([1], [-0.1], stopped=False)], alt_tokens=tokens,
                                alt_logprobs=logprobs)
    alt = deserialize_sample_response(codec.encode_sample_response(result)).prompt_alt_tokens
    assert alt is not None and alt.tokens.shape == alt.logprobs.shape == [2, 3]
    assert alt.tokens.dtype == "int64" and alt.logprobs.dtype == "float32"
    assert alt.tokens.tolist() == tokens.tolist() and alt.logprobs.tolist() == logprobs.tolist()
    empty = codec.SampleResult(sequences=[], alt_tokens=np.zeros((0, 4), np.int64),
                               alt_logprobs=np.zeros((0, 4), np.float32))
    none = deserialize_sample_response(codec.encode_sample_response(empty)).prompt_alt_tokens
    assert none is not None and none.tokens.shape == [0, 4] and none.tokens.tolist() == []
    plain = codec.SampleResult(sequences=[codec.SampledSeq([1], [-0.1], stopped=False)])
    assert deserialize_sample_response(codec.encode_sample_response(plain)).prompt_alt_tokens is None


def test_sampled_topk_and_target_logprobs_round_trip() -> None:
    result = codec.SampleResult(
        sequences=[codec.SampledSeq([3, 4], [-0.5, -0.75], True, np.array([[3, 1], [4, 2]], np.int32),
                                    np.array([[-0.5, -1.0], [-0.75, -2.0]], np.float32))],
        target_prompt_logprobs=np.array([[-1.5, 0.0], [-2.5, -3.5]], np.float32),
    )
    decoded = deserialize_sample_response(codec.encode_sample_response(result))
    assert decoded.sequences[0].topk_logprobs == [[(3, -0.5), (1, -1.0)], [(4, -0.75), (2, -2.0)]]
    target = decoded.target_prompt_logprobs
    assert target.shape == [2, 2] and target.tolist() == [[-1.5, 0.0], [-2.5, -3.5]]
