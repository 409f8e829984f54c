"""Codecs at the HTTP edge: zstd bodies, the forward_backward protobuf, lenient JSON parsing.

The forward_backward body is validated here (structure and shapes, by byte arithmetic: no numpy) and
then forwarded to the trainer verbatim, so tensors never become JSON. Callers run the decoders in a
worker thread (`asyncio.to_thread`): a big body must not stall the event loop.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import zstandard
from google.protobuf.message import DecodeError
from pydantic import BaseModel, ValidationError
from tinker.proto import tinker_public_pb2 as pb

from tinkerkube_gateway.errors import InvalidRequest, PayloadTooLarge

M = TypeVar("M", bound=BaseModel)

LOSS_FNS = frozenset({"cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce"})
_ITEM_SIZE = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_INT64: 8, pb.DTYPE_INT32: 4, pb.DTYPE_BFLOAT16: 2}


def decompress(raw: bytes, content_encoding: str | None, *, max_bytes: int) -> bytes:
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding != "zstd":
        raise InvalidRequest(f"unsupported Content-Encoding {content_encoding!r}: use zstd or none")
    try:
        out = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    except zstandard.ZstdError as exc:
        raise InvalidRequest(f"malformed zstd body: {exc}") from None
    if len(out) > max_bytes:
        raise PayloadTooLarge(f"decompressed body is larger than {max_bytes} bytes")
    return out


def parse_json(raw: bytes, model: type[M]) -> M:
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]]
        raise InvalidRequest(f"invalid {model.__name__}: " + "; ".join(parts)) from None


def parse_forward_backward(raw: bytes) -> pb.ForwardBackwardRequest:
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(raw)
    except DecodeError as exc:
        raise InvalidRequest(f"malformed ForwardBackwardRequest protobuf: {exc}") from None
    if not msg.model_id or msg.seq_id < 1:
        raise InvalidRequest("forward_backward needs model_id and seq_id >= 1")
    return msg


def check_forward_backward(raw: bytes, content_encoding: str | None,
                           max_bytes: int) -> tuple[bytes, str, int, str | None]:
    """(plain body, model_id, seq_id, problem): a body too broken to name its op raises; a well-addressed
    body with bad content returns the problem, so the caller can skip its seq_id before rejecting it."""
    plain = decompress(raw, content_encoding, max_bytes=max_bytes)
    msg = parse_forward_backward(plain)
    try:
        validate_forward_backward(msg)
    except InvalidRequest as exc:
        return plain, msg.model_id, msg.seq_id, exc.detail
    return plain, msg.model_id, msg.seq_id, None


def validate_forward_backward(msg: pb.ForwardBackwardRequest) -> None:
    if msg.loss_fn not in LOSS_FNS:
        raise InvalidRequest(f"forward_backward: unknown loss_fn {msg.loss_fn!r}; supported: {sorted(LOSS_FNS)}")
    if not msg.data:
        raise InvalidRequest("forward_backward: data is empty")
    for i, datum in enumerate(msg.data):
        n = _datum_length(datum, i)
        for name, tensor in datum.loss_fn_inputs.items():
            _check_tensor(tensor, f"data[{i}].loss_fn_inputs[{name!r}]", n)


def _datum_length(datum: pb.Datum, i: int) -> int:
    n = 0
    for chunk in datum.model_input:
        which = chunk.WhichOneof("chunk")
        if which != "encoded_text":
            raise InvalidRequest(f"data[{i}]: only text chunks are supported, got {which or 'an empty chunk'}")
        if len(chunk.encoded_text.tokens) % 4:
            raise InvalidRequest(f"data[{i}]: encoded_text.tokens is not an int32 array")
        n += len(chunk.encoded_text.tokens) // 4
    if n == 0:
        raise InvalidRequest(f"data[{i}]: model_input is empty")
    return n


def _check_tensor(tensor: pb.Tensor, where: str, n: int) -> None:
    size = _ITEM_SIZE.get(tensor.dtype)
    if size is None:
        raise InvalidRequest(f"{where}: unsupported dtype {tensor.dtype}")
    shape = list(tensor.shape)
    if tensor.WhichOneof("encoding") == "sparse_csr":
        if not shape or len(shape) != 2:
            raise InvalidRequest(f"{where}: a sparse tensor needs a 2-D shape")
    else:
        count, rem = divmod(len(tensor.dense), size)
        if rem:
            raise InvalidRequest(f"{where}: {len(tensor.dense)} bytes is not a whole number of elements")
        expected = 1
        for d in shape or [count]:
            expected *= d
        if expected != count:
            raise InvalidRequest(f"{where}: shape {shape} does not match {count} elements")
        shape = shape or [count]
    if shape[0] != n:
        raise InvalidRequest(f"{where}: first dimension {shape[0]} != model_input length {n}")


def json_bytes(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()
