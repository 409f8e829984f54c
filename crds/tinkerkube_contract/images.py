"""Image chunks: the bounds every component enforces and a header reader that needs no image library.

Why in the contract: the gateway refuses a bad image synchronously (a 4xx naming the chunk, the op's
seq consumed) and the trainer checks again before it decodes; both must apply the same limits. The
gateway has no image library, so the size check reads the PNG IHDR / JPEG SOF header only: a
decompression bomb (a tiny file claiming 60000 x 60000 pixels) is refused before anything decodes it.
The trainer then decodes the pixels with Pillow, which finds what a header cannot (a truncated or
corrupt body), and refuses that as the user's error too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

IMAGE_FORMATS = ("png", "jpeg")
MAX_IMAGE_BYTES = 10 * 1024 * 1024  # one encoded image
MAX_IMAGE_SIDE = 8192  # pixels, either side
MAX_IMAGE_PIXELS = 4096 * 4096  # width x height
MAX_IMAGES_PER_REQUEST = 64  # image chunks in one forward_backward or sample request

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class BadImage(ValueError):
    """An image chunk that is out of bounds or not the PNG/JPEG it claims to be (the user's error)."""


@dataclass(frozen=True, slots=True)
class ImageHeader:
    format: str  # "png" | "jpeg"
    width: int
    height: int


def sniff(data: bytes) -> str | None:
    """The format the bytes really are ("png", "jpeg"), or None."""
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    return None


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise BadImage("PNG without an IHDR header")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _jpeg_size(data: bytes) -> tuple[int, int]:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise BadImage("corrupt JPEG: expected a marker")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if length < 2:
            raise BadImage("corrupt JPEG: bad segment length")
        if marker in _JPEG_SOF:
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return width, height
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        pos += 2 + length
    raise BadImage("corrupt JPEG: no frame header")


def read_header(data: bytes, declared: str) -> ImageHeader:
    """Format and size from the header; BadImage when the bytes are not the declared PNG/JPEG."""
    if declared not in IMAGE_FORMATS:
        raise BadImage(f"image format {declared!r} is not supported; use one of {list(IMAGE_FORMATS)}")
    found = sniff(data)
    if found is None:
        raise BadImage(f"the image bytes are not a PNG or JPEG (declared {declared!r})")
    if found != declared:
        raise BadImage(f"the image is declared {declared!r} but its bytes are {found!r}")
    width, height = _png_size(data) if found == "png" else _jpeg_size(data)
    return ImageHeader(found, width, height)


def check_image(data: bytes, declared: str, *, max_bytes: int = MAX_IMAGE_BYTES, max_side: int = MAX_IMAGE_SIDE,
                max_pixels: int = MAX_IMAGE_PIXELS) -> ImageHeader:
    """Every bound on one image (encoded size, format, sides, pixel count); BadImage naming the first
    one broken."""
    if not data:
        raise BadImage("the image is empty")
    if len(data) > max_bytes:
        raise BadImage(f"the image is {len(data)} bytes; at most {max_bytes} are accepted")
    header = read_header(data, declared)
    if header.width < 1 or header.height < 1:
        raise BadImage(f"the image is {header.width}x{header.height} pixels")
    if max(header.width, header.height) > max_side or header.width * header.height > max_pixels:
        raise BadImage(f"the image is {header.width}x{header.height} pixels; at most {max_side} a side and "
                       f"{max_pixels} pixels are accepted")
    return header
