"""Image chunks at the gateway's edge: a forward_backward datum counts an image as its `expected_tokens`
(the SDK's `ImageChunk.length`), sampling prompts are checked chunk by chunk, and every bound is a 400
naming the chunk; the body's address is still readable, so the refused seq_id is consumed."""

from __future__ import annotations

import base64
import io
import struct

import pytest
from PIL import Image
from tinker.proto import tinker_public_pb2 as pb

from tinkerkube_contract.images import MAX_IMAGES_PER_REQUEST
from tinkerkube_gateway import wire
from tinkerkube_gateway.errors import InvalidRequest


def png(size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def body(images: list[tuple[bytes, str, int | None]], targets: int) -> bytes:
    """One datum: 2 text tokens, the images, 1 text token; loss inputs of length `targets`."""
    datum = pb.Datum()
    datum.model_input.add().encoded_text.tokens = struct.pack("<2i", 1, 2)
    for data, fmt, expected in images:
        chunk = datum.model_input.add().image
        chunk.data, chunk.format = data, fmt
        if expected is not None:
            chunk.expected_tokens = expected
    datum.model_input.add().encoded_text.tokens = struct.pack("<i", 3)
    datum.loss_fn_inputs["target_tokens"].CopyFrom(
        pb.Tensor(dense=struct.pack(f"<{targets}q", *range(targets)), dtype=pb.DTYPE_INT64, shape=[targets]))
    return pb.ForwardBackwardRequest(model_id="m", seq_id=4, loss_fn="cross_entropy", data=[datum]).SerializeToString()


def test_an_image_counts_as_its_expected_tokens() -> None:
    ok = body([(png(), "png", 5)], targets=8)
    assert wire.check_forward_backward(ok, None, 10**7)[1:3] == ("m", 4)
    with pytest.raises(InvalidRequest, match="first dimension 7 != model_input length 8"):
        wire.check_forward_backward(body([(png(), "png", 5)], targets=7), None, 10**7)


@pytest.mark.parametrize(("images", "message"), [
    ([(png(), "png", None)], "needs expected_tokens"),
    ([(b"nope", "png", 4)], r"model_input\[1\]: the image bytes are not a PNG or JPEG"),
    ([(png(), "jpeg", 4)], "declared 'jpeg'"),
    ([(png(), "webp", 4)], "not supported"),
    ([(png(), "png", 1)] * (MAX_IMAGES_PER_REQUEST + 1), "more than"),
])
def test_bad_image_chunks_are_refused_and_the_address_still_read(images: list, message: str) -> None:
    raw = body(images, targets=3 + sum(e or 0 for _, _, e in images))
    with pytest.raises(InvalidRequest, match=message):
        wire.check_forward_backward(raw, None, 10**8)
    assert wire.recover_address(raw) == wire.OpAddress("m", 4)


def _prompt(*chunks: dict) -> dict:
    return {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}, *chunks]}


def test_sampling_prompts_take_text_and_good_images() -> None:
    wire.check_prompt(_prompt({"type": "image", "data": base64.b64encode(png()).decode(), "format": "png"}))
    wire.check_prompt(_prompt({"tokens": [3]}))  # `type` defaults to encoded_text, as the SDK's model does


@pytest.mark.parametrize(("chunk", "message"), [
    ({"type": "image_asset_pointer", "format": "png", "location": "file:///etc/passwd"},
     "image_asset_pointer chunks are not served here"),  # pointers are off unless configured

    ({"type": "image", "data": "%%%", "format": "png"}, "not base64"),
    ({"type": "image", "data": base64.b64encode(b"GIF89a").decode(), "format": "png"}, "not a PNG or JPEG"),
    ({"type": "image", "data": base64.b64encode(png()).decode(), "format": "png", "expected_tokens": 0},
     "expected_tokens"),
    ({"type": "image", "format": "png"}, "base64 `data`"),
    ({"type": "dmel", "dmel": ""}, "only encoded_text, image and image_asset_pointer"),
])
def test_bad_prompt_chunks_are_400s_naming_the_chunk(chunk: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=r"prompt.chunks\[1\]: .*" + message):
        wire.check_prompt(_prompt(chunk))
