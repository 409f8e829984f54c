"""Codecs at the HTTP edge: zstd bodies, the forward_backward protobuf, lenient JSON parsing, and the
best-effort address (model_id, seq_id) of a body too broken to parse.

The forward_backward body is validated here (structure, shapes by byte arithmetic: no numpy, finite
loss config) and then forwarded to the trainer verbatim, so tensors never become JSON. Callers run the
decoders of a big body in a worker thread (`asyncio.to_thread`): it must not stall the event loop.
"""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import zstandard
from google.protobuf.message import DecodeError
from pydantic import BaseModel, ValidationError
from tinker.proto import tinker_public_pb2 as pb

from tinkerkube_contract.custom_loss import CUSTOM_LOSS_FN
from tinkerkube_contract.images import IMAGE_FORMATS, MAX_IMAGES_PER_REQUEST, BadImage, check_image
from tinkerkube_gateway.bounds import MAX_SEQ_ID, check_finite, check_json_depth
from tinkerkube_gateway.errors import InvalidRequest, PayloadTooLarge

M = TypeVar("M", bound=BaseModel)

LOSS_FNS = frozenset({"cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce",
                      CUSTOM_LOSS_FN})
# The inputs whose first dimension is the datum's length for every loss; a custom loss's own inputs have
# the ranks it declared (its trainer checks them).
_TOKEN_INPUTS = frozenset({"target_tokens"})
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


def load_json(raw: bytes) -> dict[str, Any]:
    """A JSON object body; InvalidRequest for anything else, including nesting beyond `MAX_JSON_DEPTH`."""
    check_json_depth(raw)
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data


def validate(data: dict[str, Any], model: type[M]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]]
        raise InvalidRequest(f"invalid {model.__name__}: " + "; ".join(parts)) from None


def parse_json(raw: bytes, model: type[M]) -> M:
    return validate(load_json(raw), model)


def parse_forward_backward(raw: bytes) -> pb.ForwardBackwardRequest:
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(raw)
    except DecodeError as exc:
        raise InvalidRequest(f"malformed ForwardBackwardRequest protobuf: {exc}") from None
    if not msg.model_id or msg.seq_id < 1:
        raise InvalidRequest("forward_backward needs model_id and seq_id >= 1")
    return msg


class CheckedForwardBackward(NamedTuple):
    plain: bytes
    model_id: str
    seq_id: int
    tokens: int  # of every datum's model input: what the op is billed as (services/usage.py)


def check_forward_backward(raw: bytes, content_encoding: str | None, max_bytes: int) -> CheckedForwardBackward:
    """(plain body, model_id, seq_id, tokens) of a valid request; InvalidRequest (or PayloadTooLarge) otherwise."""
    plain = decompress(raw, content_encoding, max_bytes=max_bytes)
    msg = parse_forward_backward(plain)
    tokens = validate_forward_backward(msg)
    return CheckedForwardBackward(plain, msg.model_id, msg.seq_id, tokens)


def validate_forward_backward(msg: pb.ForwardBackwardRequest) -> int:
    """The request's model-input tokens, once it is known valid."""
    if msg.loss_fn not in LOSS_FNS:
        raise InvalidRequest(f"forward_backward: unknown loss_fn {msg.loss_fn!r}; supported: {sorted(LOSS_FNS)}")
    if not msg.data:
        raise InvalidRequest("forward_backward: data is empty")
    check_finite(dict(msg.loss_fn_config), "forward_backward: loss_fn_config")
    numbers = {k: v.number for k, v in msg.loss_fn_config_v2.items() if v.WhichOneof("value") == "number"}
    check_finite(numbers, "forward_backward: loss_fn_config")
    images = total = 0
    for i, datum in enumerate(msg.data):
        n = _datum_length(datum, i)
        total += n
        images += sum(1 for chunk in datum.model_input if chunk.WhichOneof("chunk") == "image")
        if images > MAX_IMAGES_PER_REQUEST:
            raise InvalidRequest(f"forward_backward: more than {MAX_IMAGES_PER_REQUEST} image chunks in one request")
        for name, tensor in datum.loss_fn_inputs.items():
            length = None if msg.loss_fn == CUSTOM_LOSS_FN and name not in _TOKEN_INPUTS else n
            _check_tensor(tensor, f"data[{i}].loss_fn_inputs[{name!r}]", length)
    return total


def _datum_length(datum: pb.Datum, i: int) -> int:
    n = 0
    for j, chunk in enumerate(datum.model_input):
        which = chunk.WhichOneof("chunk")
        if which == "image":
            n += _image_length(chunk.image, f"data[{i}].model_input[{j}]")
            continue
        if which != "encoded_text":
            raise InvalidRequest(f"data[{i}]: only text and image chunks are supported, "
                                 f"got {which or 'an empty chunk'}")
        if len(chunk.encoded_text.tokens) % 4:
            raise InvalidRequest(f"data[{i}]: encoded_text.tokens is not an int32 array")
        n += len(chunk.encoded_text.tokens) // 4
    if n == 0:
        raise InvalidRequest(f"data[{i}]: model_input is empty")
    return n


def _image_length(image: pb.ImageChunk, where: str) -> int:
    """An image chunk's token count (its `expected_tokens`, which the trainer checks against the model's
    processor) after the bounds every image must meet."""
    check_image_chunk(image.data, image.format, where)
    if not image.HasField("expected_tokens") or image.expected_tokens < 1:
        raise InvalidRequest(f"{where}: an image chunk in forward_backward needs expected_tokens >= 1 (its token "
                             "count, which the loss_fn_inputs' length includes)")
    return int(image.expected_tokens)


def check_image_chunk(data: bytes, declared: str, where: str) -> None:
    try:
        check_image(data, declared)
    except BadImage as exc:
        raise InvalidRequest(f"{where}: {exc}") from None


def check_prompt(prompt: Any, *, pointers: bool = False) -> None:
    """A sampling prompt's chunks (JSON, told apart by `type`): text, image bytes within bounds, and, when
    this gateway resolves them (`pointers`: services/image_assets.py), well-formed image asset pointers.
    Pointers count towards the per-request image bound as the images they stand for."""
    chunks = prompt.get("chunks") if isinstance(prompt, dict) else None
    if not isinstance(chunks, list):
        raise InvalidRequest("prompt: needs a list of chunks")
    images = 0
    for j, chunk in enumerate(chunks):
        kind = chunk.get("type", "encoded_text") if isinstance(chunk, dict) else None
        where = f"prompt.chunks[{j}]"
        if kind == "encoded_text":
            continue
        if kind not in ("image", "image_asset_pointer"):
            raise InvalidRequest(f"{where}: only encoded_text, image and image_asset_pointer chunks are supported, "
                                 f"got {kind!r}")
        images += 1
        if images > MAX_IMAGES_PER_REQUEST:
            raise InvalidRequest(f"prompt: more than {MAX_IMAGES_PER_REQUEST} image chunks")
        if kind == "image":
            _check_json_image(chunk, where)
        else:
            _check_pointer(chunk, where, pointers)
        expected = chunk.get("expected_tokens")
        if expected is not None and (not isinstance(expected, int) or isinstance(expected, bool) or expected < 1):
            raise InvalidRequest(f"{where}: expected_tokens must be a positive integer")


def _check_json_image(chunk: dict[str, Any], where: str) -> None:
    data, declared = chunk.get("data"), chunk.get("format")
    if not isinstance(data, str) or not isinstance(declared, str):
        raise InvalidRequest(f"{where}: an image chunk needs base64 `data` and a `format`")
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise InvalidRequest(f"{where}: `data` is not base64") from None
    check_image_chunk(raw, declared, where)


MAX_LOCATION_CHARS = 4096


def _check_pointer(chunk: dict[str, Any], where: str, enabled: bool) -> None:
    """The shape of an image asset pointer; whether its location may be fetched is the resolver's call."""
    if not enabled:
        raise InvalidRequest(f"{where}: image_asset_pointer chunks are not served here (this gateway fetches no "
                             "URLs or paths unless its operator allows some: TINKERKUBE_GATEWAY_IMAGE_ASSET_HOSTS, "
                             "TINKERKUBE_GATEWAY_IMAGE_ASSET_ROOT); send the image bytes as an ImageChunk")
    location, declared = chunk.get("location"), chunk.get("format")
    if not isinstance(location, str) or not 0 < len(location) <= MAX_LOCATION_CHARS:
        raise InvalidRequest(f"{where}: an image_asset_pointer needs a `location` of 1 to {MAX_LOCATION_CHARS} "
                             "characters")
    if declared not in IMAGE_FORMATS:
        raise InvalidRequest(f"{where}: image format {declared!r} is not supported; use one of "
                             f"{list(IMAGE_FORMATS)}")


def may_be_custom_loss(plain: bytes) -> bool:
    """False for a forward_backward body that cannot run a stored custom loss (a byte test: no parse)."""
    return CUSTOM_LOSS_FN.encode() in plain


def _check_tensor(tensor: pb.Tensor, where: str, n: int | None) -> None:
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
    if n is not None and shape and shape[0] != n:
        raise InvalidRequest(f"{where}: first dimension {shape[0]} != model_input length {n}")


def json_bytes(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


# --- the address of a refused body ------------------------------------------------------------------
ADDRESS_PREFIX_BYTES = 256 * 1024  # both fields come first in every SDK body; this holds a whole zstd block
_JSON_MODEL_ID = re.compile(rb'"model_id"\s*:\s*"([^"\\]{1,250})"')
_JSON_SEQ_ID = re.compile(rb'"seq_id"\s*:\s*(\d{1,10})(?![\d.eE])')


@dataclass(frozen=True, slots=True)
class OpAddress:
    model_id: str
    seq_id: int


def recover_address(raw: bytes, content_encoding: str | None = None) -> OpAddress | None:
    """The (model_id, seq_id) a refused request names, read from a body that may be malformed,
    truncated (a 413 keeps only a prefix) or zstd-compressed; None when it names none. Best effort: a
    request we cannot even parse may still use a seq_id that later ops of its run wait for."""
    head = raw[:ADDRESS_PREFIX_BYTES]
    if (content_encoding or "").strip().lower() == "zstd":
        try:  # only the start of the output: a bomb decompresses no further than that
            head = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(head)).read(ADDRESS_PREFIX_BYTES)
        except zstandard.ZstdError:
            return None
    found = _json_address(head) if head.lstrip()[:1] == b"{" else _protobuf_address(head)
    if found is None or not 1 <= found[1] <= MAX_SEQ_ID:
        return None
    return OpAddress(*found)


def _json_address(head: bytes) -> tuple[str, int] | None:
    model_id, seq_id = _JSON_MODEL_ID.search(head), _JSON_SEQ_ID.search(head)
    if model_id is None or seq_id is None:
        return None
    return model_id.group(1).decode(errors="replace"), int(seq_id.group(1))


def _protobuf_address(head: bytes) -> tuple[str, int] | None:
    """Fields 1 (model_id, a string) and 2 (seq_id, a varint) of ForwardBackwardRequest, read field by
    field until both are found or the bytes stop making sense."""
    model_id: str | None = None
    seq_id: int | None = None
    pos = 0
    try:
        while pos < len(head) and (model_id is None or seq_id is None):
            key, pos = _varint(head, pos)
            field, kind = key >> 3, key & 7
            if kind == 0:
                value, pos = _varint(head, pos)
                seq_id = value if field == 2 else seq_id
            elif kind == 2:
                size, pos = _varint(head, pos)
                if field == 1:
                    model_id = head[pos:pos + size].decode()
                pos += size
            elif kind in (1, 5):
                pos += 8 if kind == 1 else 4
            else:
                return None
    except (IndexError, UnicodeDecodeError):
        return None
    return (model_id, seq_id) if model_id and seq_id is not None else None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80 or shift > 63:
            return value, pos
        shift += 7
