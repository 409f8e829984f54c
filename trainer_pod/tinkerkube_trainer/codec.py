"""Wire ↔ engine types: the SDK's protobuf and JSON in, typed numpy payloads out, and back.

Why here and not in the engine: decoding is pure and must fail with a user error on anything
malformed before any model state is touched (rank 0 `prepare`). We reuse the SDK's own generated
module `tinker.proto.tinker_public_pb2` and `tinker.types` so the schema is never written twice.
Payloads are plain dataclasses of numpy arrays: picklable, so rank 0 can broadcast them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from pydantic import ValidationError
from tinker.proto import tinker_public_pb2 as pb
from tinker.types import SampleRequest

from tinkerkube_contract.pod_api import DEFAULT_MAX_TOKENS
from tinkerkube_trainer.engine_api import OpError
from tinkerkube_trainer.sample_checks import validate_sample
from tinkerkube_trainer.vision import EncodedImage, ImageBatch, Images, image_tokens

TOPK_PAD_TOKEN = 0
TOPK_PAD_LOGPROB = -99999.0
_NUMPY_DTYPES = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}


@dataclass(frozen=True, slots=True)
class DatumData:
    tokens: np.ndarray  # int64 (N,); an image chunk is its run of image tokens
    inputs: dict[str, np.ndarray]  # loss_fn_inputs by name, first dimension N
    images: ImageBatch | None = None  # the datum's images in token order


@dataclass(frozen=True, slots=True)
class ForwardBackwardPayload:
    model_id: str
    seq_id: int
    loss_fn: str  # as requested; the engine canonicalises it
    config: dict[str, float | str]  # loss_fn_config_v2 (numbers and text)
    legacy_config: dict[str, float]  # loss_fn_config (numbers only)
    forward_only: bool
    datums: tuple[DatumData, ...]


@dataclass(frozen=True, slots=True)
class SampleParams:
    """Decoded SampleRequest. `stop_strings`/`stop_tokens` both None → stop at EOS; both empty → never."""

    prompt: tuple[int, ...]
    num_samples: int = 1
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: tuple[str, ...] | None = None
    stop_tokens: tuple[int, ...] | None = None
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    prompt_logprobs_last_n: int | None = None
    topk_sample_logprobs: int = 0
    target_prompt_ids: np.ndarray | None = None  # int64 (len(prompt) - 1, K); -1 asks for nothing
    images: ImageBatch | None = None  # the prompt's images in token order
    prompt_alt_tokens_k: int = 0  # draws at every prompt position after the first (`token_draw`)


@dataclass(frozen=True, slots=True)
class SampledSeq:
    tokens: list[int]
    logprobs: list[float]
    stopped: bool  # True: a stop token/string or EOS ended it; False: max_tokens
    topk_ids: np.ndarray | None = None  # int32 (len(tokens), k) when topk_sample_logprobs > 0
    topk_logprobs: np.ndarray | None = None


@dataclass(slots=True)
class SampleResult:
    sequences: list[SampledSeq]
    prompt_logprobs: np.ndarray | None = None  # float32 (len(prompt),), NaN where not scored
    topk_ids: np.ndarray | None = None  # int32 (len(prompt), k)
    topk_logprobs: np.ndarray | None = None  # float32 (len(prompt), k)
    target_prompt_logprobs: np.ndarray | None = None  # float32, the shape of target_prompt_ids; 0.0 where -1
    alt_tokens: np.ndarray | None = None  # int64 (len(prompt) - 1, prompt_alt_tokens_k)
    alt_logprobs: np.ndarray | None = None  # float32, the same shape: their logprobs at temperature 1
    extra: dict[str, object] = field(default_factory=dict)


# ---------------------------------------------------------------- forward_backward request


def decode_tensor(msg: pb.Tensor, name: str) -> np.ndarray:
    """Dense or sparse-CSR `Tensor` → numpy; a missing shape means 1-D; sparse gaps are 0."""
    dtype = _NUMPY_DTYPES.get(msg.dtype)
    if dtype is None:
        raise OpError(f"loss_fn_inputs[{name!r}]: unsupported dtype {msg.dtype}", code="invalid_tensor")
    shape = [int(s) for s in msg.shape]
    try:
        if msg.HasField("sparse_csr"):
            csr = msg.sparse_csr
            values = np.frombuffer(csr.values, dtype=dtype)
            crow = np.frombuffer(csr.crow_indices, dtype=np.int64)
            col = np.frombuffer(csr.col_indices, dtype=np.int64)
            if len(shape) != 2 or len(crow) != shape[0] + 1 or len(col) != len(values) or crow[-1] != len(values):
                raise ValueError("sparse CSR needs a 2-D shape, rows+1 crow indices and one column per value")
            if np.any(np.diff(crow) < 0) or (len(col) and (col.min() < 0 or col.max() >= shape[1])):
                raise ValueError("sparse CSR indices out of range")
            dense = np.zeros(shape, dtype=dtype)
            rows = np.repeat(np.arange(shape[0]), np.diff(crow))
            dense[rows, col] = values
            return dense
        flat = np.frombuffer(msg.dense, dtype=dtype)
    except ValueError as exc:
        raise OpError(f"loss_fn_inputs[{name!r}]: {exc}", code="invalid_tensor") from None
    if not shape:
        return flat.copy()
    if any(s < 0 for s in shape) or int(np.prod(shape)) != flat.size:
        raise OpError(f"loss_fn_inputs[{name!r}]: shape {shape} does not match {flat.size} values", code="bad_shape")
    return flat.reshape(shape).copy()


def _chunk_tokens(chunk: pb.Chunk, where: str, images: Images | None, seen: list[EncodedImage]) -> np.ndarray:
    kind = chunk.WhichOneof("chunk")
    if kind == "image":
        img = chunk.image
        expected = img.expected_tokens if img.HasField("expected_tokens") else None
        return image_tokens(images, img.data, img.format, expected, where, seen)
    if kind != "encoded_text":
        raise OpError(f"{where}: only text and image chunks are supported, got {kind or 'an empty chunk'}",
                      code="unsupported_chunk")
    raw = chunk.encoded_text.tokens
    if len(raw) % 4:
        raise OpError(f"{where}: token bytes are not a whole number of int32", code="invalid_tokens")
    return np.frombuffer(raw, dtype="<i4").astype(np.int64)


def decode_forward_backward(body: bytes, images: Images | None = None) -> ForwardBackwardPayload:
    """`ForwardBackwardRequest` protobuf bytes → payload. Shapes are checked later, per loss. Image chunks
    need `images` (a vision-language model): each becomes its image tokens and pixel patches."""
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise OpError(f"malformed ForwardBackwardRequest protobuf: {exc}", code="malformed_protobuf") from None
    datums = []
    seen: list[EncodedImage] = []
    for i, d in enumerate(msg.data):
        first = len(seen)
        parts = [_chunk_tokens(c, f"datum {i} chunk {j}", images, seen) for j, c in enumerate(d.model_input)]
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        inputs = {name: decode_tensor(t, name) for name, t in d.loss_fn_inputs.items()}
        datums.append(DatumData(tokens=tokens, inputs=inputs, images=ImageBatch.of(seen[first:])))
    config: dict[str, float | str] = {}
    for key, value in msg.loss_fn_config_v2.items():
        which = value.WhichOneof("value")
        if which is not None:
            config[key] = value.text if which == "text" else float(value.number)
    return ForwardBackwardPayload(
        model_id=msg.model_id,
        seq_id=int(msg.seq_id),
        loss_fn=msg.loss_fn,
        config=config,
        legacy_config={k: float(v) for k, v in msg.loss_fn_config.items()},
        forward_only=bool(msg.forward_only),
        datums=tuple(datums),
    )


# ---------------------------------------------------------------- forward_backward output


def _batched(arrays: Sequence[np.ndarray], dtype: np.dtype, pb_dtype: int) -> pb.BatchedTensor:
    """Per-datum arrays of one trailing shape (e.g. `(N,)` or `(N, K)`) → one BatchedTensor."""
    trailing = {tuple(a.shape[1:]) for a in arrays}
    if len(trailing) > 1:
        raise ValueError(f"one field needs one trailing shape per record, got {sorted(trailing)}")
    parts = [np.ascontiguousarray(a, dtype=dtype).reshape(-1) for a in arrays]
    sizes = np.array([0] + [p.nbytes for p in parts], dtype=np.int64)
    return pb.BatchedTensor(
        data=b"".join(p.tobytes() for p in parts),
        offsets=np.cumsum(sizes).astype("<i8").tobytes(),
        dtype=pb_dtype,
        trailing_shape=list(trailing.pop()) if trailing else [],
    )


def encode_forward_backward_output(
    outputs: Sequence[Mapping[str, np.ndarray]], metrics: Mapping[str, float]
) -> bytes:
    """Per-datum float32 `(N,)` or `(N, K)` fields (in request order) + `name:reduction` metrics → bytes."""
    for key in metrics:
        if key.count(":") != 1:
            raise ValueError(f"metric key {key!r} must be name:reduction")
    if "loss:sum" not in metrics:
        raise ValueError("metrics must contain loss:sum")
    record = pb.ArrayRecord(type_tag="ArrayRecord", num_datums=len(outputs))
    names = sorted({name for out in outputs for name in out})
    for name in names:
        record.fields[name].CopyFrom(_batched([out[name] for out in outputs], np.dtype("<f4"), pb.DTYPE_FLOAT32))
    msg = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    msg.loss_fn_outputs.append(record)
    for key, value in metrics.items():
        msg.metrics[key] = float(value)
    return msg.SerializeToString()


# ---------------------------------------------------------------- sample request / response


def decode_sample_request(request: Mapping[str, object], images: Images | None = None) -> SampleParams:
    """The SDK's SampleRequest JSON (inside pod_api.SampleOp) → SampleParams, validated. Image chunks need
    `images` (a vision-language model). Asset pointers (a path or URL) are refused: the gateway resolves them
    into image chunks before the op is stored, and a trainer fetches nothing."""
    try:
        req = SampleRequest.model_validate(dict(request))
    except ValidationError as exc:
        raise OpError(f"invalid sample request: {exc.errors()[:3]}", code="invalid_sample_request") from None
    tokens: list[int] = []
    seen: list[EncodedImage] = []
    for i, chunk in enumerate(req.prompt.chunks):
        kind = getattr(chunk, "type", None)
        if kind == "image":
            tokens.extend(int(t) for t in image_tokens(images, chunk.data, chunk.format,  # type: ignore[union-attr]
                                                       chunk.expected_tokens, f"prompt chunk {i}", seen))  # type: ignore[union-attr]
            continue
        if kind == "image_asset_pointer":
            raise OpError(f"prompt chunk {i}: an unresolved image_asset_pointer (the gateway turns pointers into "
                          "image bytes; trainers fetch no paths or URLs)", code="unsupported_chunk")
        if kind != "encoded_text":
            raise OpError(f"prompt chunk {i}: only text and image chunks are supported", code="unsupported_chunk")
        tokens.extend(int(t) for t in chunk.tokens)  # type: ignore[union-attr]
    sp = req.sampling_params
    stop_strings: tuple[str, ...] | None = None
    stop_tokens: tuple[int, ...] | None = None
    if isinstance(sp.stop, str):
        stop_strings = (sp.stop,)
    elif sp.stop is not None:
        stops = list(sp.stop)
        if all(isinstance(s, str) for s in stops):
            stop_strings = tuple(stops)  # type: ignore[arg-type]
        if not stops:
            stop_tokens = ()
        elif all(isinstance(s, int) and not isinstance(s, bool) for s in stops):
            stop_tokens, stop_strings = tuple(stops), None  # type: ignore[arg-type]
        elif stop_strings is None:
            raise OpError("sampling_params.stop mixes strings and token ids", code="invalid_sample_request")
    params = SampleParams(
        prompt=tuple(tokens),
        num_samples=int(req.num_samples),
        max_tokens=DEFAULT_MAX_TOKENS if sp.max_tokens is None else int(sp.max_tokens),
        temperature=float(sp.temperature),
        top_k=int(sp.top_k),
        top_p=float(sp.top_p),
        seed=sp.seed,
        stop_strings=stop_strings,
        stop_tokens=stop_tokens,
        prompt_logprobs=bool(req.prompt_logprobs),
        topk_prompt_logprobs=int(req.topk_prompt_logprobs or 0),
        prompt_logprobs_last_n=req.prompt_logprobs_last_n,
        topk_sample_logprobs=int(req.topk_sample_logprobs or 0),
        target_prompt_ids=None if req.target_prompt_logprobs is None else _target_ids(req.target_prompt_logprobs),
        images=ImageBatch.of(seen),
        prompt_alt_tokens_k=int(req.prompt_alt_tokens_k or 0),
    )
    validate_sample(params)
    return params


def _target_ids(td: Any) -> np.ndarray:
    """TensorData JSON (dense or sparse CSR, cells of -1 ask for nothing) → int64 `(rows, K)`."""
    pb_msg = pb.Tensor(dtype=pb.DTYPE_INT64, shape=list(td.shape or []))
    values = np.asarray(td.data, dtype=np.int64)
    if td.sparse_crow_indices is not None:
        pb_msg.sparse_csr.values = (values + 1).tobytes()  # shift so the zero fill means -1
        pb_msg.sparse_csr.crow_indices = np.asarray(td.sparse_crow_indices, np.int64).tobytes()
        pb_msg.sparse_csr.col_indices = np.asarray(td.sparse_col_indices or [], np.int64).tobytes()
        ids = decode_tensor(pb_msg, "target_prompt_logprobs") - 1
    else:
        pb_msg.dense = values.tobytes()
        ids = decode_tensor(pb_msg, "target_prompt_logprobs")
    if ids.ndim != 2:
        raise OpError("target_prompt_logprobs must be a 2-D [len(prompt) - 1, K] tensor", code="bad_shape")
    return ids


def encode_sample_response(result: SampleResult) -> bytes:
    """SampleResult → `tinker_public.SampleResponse` bytes (§4.6); logprobs always present."""
    msg = pb.SampleResponse(prompt_cache_hit_tokens=0)
    for seq in result.sequences:
        out = msg.sequences.add(
            stop_reason=pb.STOP_REASON_STOP if seq.stopped else pb.STOP_REASON_LENGTH,
            tokens=np.asarray(seq.tokens, dtype="<i4").tobytes(),
            logprobs=np.asarray(seq.logprobs, dtype="<f4").tobytes(),
        )
        if seq.topk_ids is not None and seq.topk_logprobs is not None:
            out.topk_sampled_logprobs.CopyFrom(_topk(seq.topk_ids, seq.topk_logprobs))
    if result.prompt_logprobs is not None:
        msg.prompt_logprobs = np.asarray(result.prompt_logprobs, dtype="<f4").tobytes()
    if result.topk_ids is not None and result.topk_logprobs is not None:
        msg.topk_prompt_logprobs.CopyFrom(_topk(result.topk_ids, result.topk_logprobs))
    if result.target_prompt_logprobs is not None:
        msg.target_prompt_logprobs.CopyFrom(_dense(result.target_prompt_logprobs, pb.DTYPE_FLOAT32))
    if result.alt_tokens is not None and result.alt_logprobs is not None:
        msg.prompt_alt_tokens.CopyFrom(pb.PromptAltTokens(tokens=_dense(result.alt_tokens, pb.DTYPE_INT64),
                                                          logprobs=_dense(result.alt_logprobs, pb.DTYPE_FLOAT32)))
    return msg.SerializeToString()


def _dense(values: np.ndarray, dtype: int) -> pb.Tensor:
    little = np.asarray(values, dtype=np.dtype(_NUMPY_DTYPES[dtype]).newbyteorder("<"))
    return pb.Tensor(dense=little.tobytes(), dtype=dtype, shape=list(little.shape))


def _topk(ids: np.ndarray, logprobs: np.ndarray) -> pb.TopkLogprobs:
    n, k = ids.shape
    return pb.TopkLogprobs(token_ids=np.asarray(ids, dtype="<i4").tobytes(),
                           logprobs=np.asarray(logprobs, dtype="<f4").tobytes(), k=k, length=n)


# ---------------------------------------------------------------- validation


TOPK_INPUTS = ("target_tokens", "weights")  # may be (N, K) for cross_entropy: top-K distillation


def validate_forward_backward(
    payload: ForwardBackwardPayload, required: Sequence[str], vocab_size: int, *, allow_topk: bool = False
) -> None:
    """Shapes, ids and required inputs, checked before anything runs (one bad datum fails the call).
    With `allow_topk`, target_tokens/weights may be `(N, K)`, with one K for the whole call."""
    if not payload.datums:
        raise OpError("forward_backward needs at least one datum", code="empty_data")
    present: dict[str, int] = {}
    trailing: set[tuple[int, ...]] = set()
    for i, d in enumerate(payload.datums):
        n = int(d.tokens.shape[0])
        if n == 0:
            raise OpError(f"datum {i}: model_input is empty", code="empty_data")
        if d.tokens.min() < 0 or d.tokens.max() >= vocab_size:
            raise OpError(f"datum {i}: model_input has token ids outside [0, {vocab_size})", code="token_out_of_range")
        for name in required:
            if name not in d.inputs:
                raise OpError(f"datum {i}: loss {payload.loss_fn!r} needs loss_fn_inputs[{name!r}]",
                              code="missing_loss_input")
        for name, arr in d.inputs.items():
            present[name] = present.get(name, 0) + 1
            _check_input(i, name, arr, n, allow_topk and name in TOPK_INPUTS)
            if name in TOPK_INPUTS:
                trailing.add(tuple(arr.shape[1:]))
        targets = d.inputs.get("target_tokens")
        if targets is not None and (not np.issubdtype(targets.dtype, np.integer) or targets.min() < 0
                                    or targets.max() >= vocab_size):
            raise OpError(f"datum {i}: target_tokens must be integer ids in [0, {vocab_size})",
                          code="token_out_of_range")
    partial = sorted(k for k, count in present.items() if count != len(payload.datums))
    if partial:
        raise OpError(f"loss_fn_inputs {partial} must be given for every datum or for none", code="bad_shape")
    if len(trailing) > 1:
        raise OpError("target_tokens and weights must all be (N,) or all (N, K) with one K per call", code="bad_shape")


def _check_input(i: int, name: str, arr: np.ndarray, n: int, may_be_2d: bool) -> None:
    if arr.ndim != 1 and not (may_be_2d and arr.ndim == 2 and arr.shape[1] > 0):
        allowed = "(N,) or (N, K)" if may_be_2d else "(N,)"
        raise OpError(f"datum {i}: loss_fn_inputs[{name!r}] has shape {list(arr.shape)}; expected {allowed}",
                      code="bad_shape")
    if arr.shape[0] != n:
        raise OpError(f"datum {i}: loss_fn_inputs[{name!r}] has length {arr.shape[0]} but model_input has "
                      f"{n} tokens (position i predicts target i)", code="bad_shape")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise OpError(f"datum {i}: loss_fn_inputs[{name!r}] contains NaN or infinity", code="bad_value")
