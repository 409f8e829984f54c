"""Edge codecs: zstd bodies, forward_backward validation by byte arithmetic, lenient JSON."""

from __future__ import annotations

import pytest
import zstandard

from tests.support.gateway_raw import fwdbwd_body
from tinkerkube_gateway import wire
from tinkerkube_gateway.errors import InvalidRequest, PayloadTooLarge
from tinkerkube_gateway.schemas import CreateModelRequest


def test_zstd_bodies_are_decompressed_and_bombs_refused() -> None:
    body = fwdbwd_body("s:train:0", 1)
    assert wire.decompress(zstandard.ZstdCompressor().compress(body), "zstd", max_bytes=10**6) == body
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 2_000_000)
    with pytest.raises(PayloadTooLarge):
        wire.decompress(bomb, "zstd", max_bytes=1_000_000)
    with pytest.raises(InvalidRequest, match="zstd"):
        wire.decompress(b"not zstd", "zstd", max_bytes=100)
    with pytest.raises(InvalidRequest, match="Content-Encoding"):
        wire.decompress(b"x", "br", max_bytes=100)


def test_a_valid_request_passes_through_untouched() -> None:
    body = fwdbwd_body("s:train:0", 3)
    assert wire.check_forward_backward(body, None, 10**6)[:3] == (body, "s:train:0", 3)


@pytest.mark.parametrize(("body", "message"), [
    (fwdbwd_body("m", 1, n=4, targets=5), "first dimension"),
    (fwdbwd_body("m", 1, loss_fn="mystery"), "unknown loss_fn"),
])
def test_bad_content_is_refused_and_its_address_still_read(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        wire.check_forward_backward(body, None, 10**6)
    assert wire.recover_address(body) == wire.OpAddress("m", 1)


def test_an_unaddressable_body_is_rejected_outright() -> None:
    with pytest.raises(InvalidRequest, match="protobuf"):
        wire.check_forward_backward(b"\xff\xff\xff", None, 100)
    with pytest.raises(InvalidRequest, match="seq_id"):
        wire.check_forward_backward(fwdbwd_body("m", 0), None, 10**6)


def test_json_requests_ignore_unknown_fields_but_report_missing_ones() -> None:
    raw = b'{"session_id": "s", "model_seq_id": 0, "base_model": "b", "brand_new_field": 1}'
    assert wire.parse_json(raw, CreateModelRequest).base_model == "b"
    with pytest.raises(InvalidRequest, match="base_model"):
        wire.parse_json(b'{"session_id": "s", "model_seq_id": 0}', CreateModelRequest)
    with pytest.raises(InvalidRequest, match="not JSON"):
        wire.parse_json(b"{nope", CreateModelRequest)
