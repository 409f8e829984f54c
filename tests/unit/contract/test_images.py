"""The image-chunk bounds shared by the gateway and the trainer: formats told by their bytes, sizes read
from the header alone (so a decompression bomb is refused before anything decodes it)."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from tinkerkube_contract.images import MAX_IMAGE_SIDE, BadImage, check_image, read_header


def encoded(fmt: str, size: tuple[int, int], **kwargs: object) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


@pytest.mark.parametrize(("fmt", "declared", "kwargs"), [
    ("PNG", "png", {}), ("JPEG", "jpeg", {}), ("JPEG", "jpeg", {"progressive": True}),
    ("JPEG", "jpeg", {"exif": b"Exif\x00\x00" + b"\x00" * 300}),
])
def test_the_header_gives_the_size_pillow_reports(fmt: str, declared: str, kwargs: dict) -> None:
    data = encoded(fmt, (123, 45), **kwargs)
    header = read_header(data, declared)
    assert (header.format, header.width, header.height) == (declared, 123, 45)
    assert check_image(data, declared) == header


@pytest.mark.parametrize(("data", "declared", "problem"), [
    (b"", "png", "empty"),
    (b"GIF89a....", "png", "not a PNG or JPEG"),
    (encoded("PNG", (8, 8)), "jpeg", "declared 'jpeg' but its bytes are 'png'"),
    (encoded("PNG", (8, 8)), "gif", "not supported"),
    (b"\xff\xd8\xff" + b"\x00" * 20, "jpeg", "corrupt JPEG"),
    (png_claiming(30000, 30000), "png", "30000x30000"),
    (png_claiming(MAX_IMAGE_SIDE + 1, 1), "png", "at most"),
    (png_claiming(0, 5), "png", "0x5"),
])
def test_bad_images_name_their_problem(data: bytes, declared: str, problem: str) -> None:
    with pytest.raises(BadImage, match=problem):
        check_image(data, declared)


def test_the_byte_limit_applies_before_anything_is_parsed() -> None:
    with pytest.raises(BadImage, match="bytes"):
        check_image(encoded("PNG", (64, 64)), "png", max_bytes=10)
