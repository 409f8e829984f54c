"""The image asset pointer resolver (services/image_assets.py): which hosts and paths it may read, that
oversized bodies are cut off while they stream, and that every failure is a 400 naming the chunk. URLs are
fetched from a real HTTP server on 127.0.0.1 (tests/support/asset_server.py)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.support.asset_server import AssetServer, asset_server
from tinkerkube_contract.images import MAX_IMAGE_BYTES
from tinkerkube_gateway import wire
from tinkerkube_gateway.errors import InvalidRequest
from tinkerkube_gateway.metrics import Metrics
from tinkerkube_gateway.services.image_assets import (
    AssetRefused,
    AssetSources,
    ImageAssets,
    host_allowed,
    parse_host_pattern,
    path_inside,
)
from tinkerkube_gateway.settings import GatewaySettings


def png(size: tuple[int, int] = (16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (0, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _patterns(*entries: str) -> tuple[tuple[str, int | None], ...]:
    return tuple(parse_host_pattern(e) for e in entries)


@pytest.mark.parametrize(("host", "port", "entries", "allowed"), [
    ("images.example.com", 443, ["images.example.com"], True),
    ("IMAGES.example.com.", 443, ["images.example.com"], True),
    ("images.example.com", 8443, ["images.example.com:443"], False),
    ("images.example.com", 443, ["images.example.com:443"], True),
    ("a.b.example.com", 443, ["*.example.com"], True),
    ("example.com", 443, ["*.example.com"], False),  # the suffix itself is not a subdomain
    ("evilexample.com", 443, ["*.example.com"], False),
    ("example.com.evil.net", 443, ["example.com"], False),
    ("127.0.0.1", 8000, ["127.0.0.1"], True),
    ("::1", 8000, ["[::1]:8000"], True),
    ("10.0.0.1", 80, [], False),
])
def test_host_allowlist(host: str, port: int, entries: list[str], allowed: bool) -> None:
    assert host_allowed(host, port, _patterns(*entries)) is allowed


@pytest.mark.parametrize("entry", ["", "*", "*.", "a*.example.com", "example.*", "http://example.com/x",
                                   "user@example.com", "example.com:notaport"])
def test_bad_allowlist_entries_are_refused_at_startup(entry: str) -> None:
    with pytest.raises(ValueError):
        GatewaySettings(image_asset_hosts=[entry])


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "assets" / "sub").mkdir(parents=True)
    (tmp_path / "assets" / "sub" / "a.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(png())
    os.symlink(tmp_path / "secret.png", tmp_path / "assets" / "escape.png")
    os.symlink(tmp_path / "assets" / "sub" / "a.png", tmp_path / "assets" / "inside.png")
    return tmp_path / "assets"


@pytest.mark.parametrize("location", ["sub/a.png", "inside.png", "{root}/sub/a.png", "file://{root}/sub/a.png",
                                      "file://localhost{root}/sub/%61.png"])
def test_paths_inside_the_root_resolve(root: Path, location: str) -> None:
    """Relative to the root, a symlink that stays inside, an absolute path or file:// URL inside it."""
    assert path_inside(root, location.format(root=root)) == (root / "sub" / "a.png").resolve()


@pytest.mark.parametrize(("location", "outcome"), [
    ("../secret.png", "not_allowed"),
    ("sub/../../secret.png", "not_allowed"),
    ("escape.png", "not_allowed"),  # a symlink pointing out of the root
    ("/etc/passwd", "not_allowed"),
    ("file:///etc/passwd", "not_allowed"),
    ("file://otherhost/sub/a.png", "not_allowed"),
    ("missing.png", "failed"),
    ("sub", "failed"),  # a directory
])
def test_paths_outside_the_root_are_refused(root: Path, location: str, outcome: str) -> None:
    with pytest.raises(AssetRefused) as info:
        path_inside(root, location)
    assert info.value.outcome == outcome


@pytest.fixture(scope="module")
def server() -> Iterator[AssetServer]:
    with asset_server() as s:
        s.files["ok.png"] = png()
        s.files["big.png"] = png() + b"\x00" * MAX_IMAGE_BYTES
        s.files["notes.txt"] = b"just text"
        yield s


def _resolver(server: AssetServer | None = None, root: Path | None = None, timeout: float = 2.0,
              max_request_bytes: int = 64 * 1024 * 1024) -> ImageAssets:
    hosts = (f"127.0.0.1:{server.port}",) if server else ()
    return ImageAssets(AssetSources(hosts=hosts, root=root, timeout_seconds=timeout,
                                    max_request_bytes=max_request_bytes), Metrics())


def _prompt(*locations: str, fmt: str = "png") -> dict[str, Any]:
    pointers = [{"type": "image_asset_pointer", "format": fmt, "location": loc, "expected_tokens": 4}
                for loc in locations]
    return {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}, *pointers]}


def _count(assets: ImageAssets, source: str, outcome: str) -> float:
    return assets.metrics.registry.get_sample_value(  # type: ignore[union-attr]
        "tinkerkube_gateway_image_asset_fetches_total", {"source": source, "outcome": outcome}) or 0.0


def test_a_url_and_a_path_become_image_chunks_of_the_same_bytes(server: AssetServer, root: Path) -> None:
    assets = _resolver(server, root)
    prompt = _prompt(server.url("/files/ok.png"), "sub/a.png")
    wire.check_prompt(prompt, pointers=True)
    asyncio.run(assets.resolve_prompt(prompt))
    text, from_url, from_path = prompt["chunks"]
    assert text == {"type": "encoded_text", "tokens": [1, 2]}
    assert from_url == {"type": "image", "data": base64.b64encode(png()).decode(), "format": "png",
                        "expected_tokens": 4}
    assert base64.b64decode(from_path["data"]) == (root / "sub" / "a.png").read_bytes()
    wire.check_prompt(prompt)  # what is stored is an ordinary prompt: valid with pointers off
    assert _count(assets, "url", "ok") == 1 and _count(assets, "file", "ok") == 1


@pytest.mark.parametrize(("path", "fmt", "message", "outcome"), [
    ("/files/missing.png", "png", "answered 404", "failed"),
    ("/files/notes.txt", "png", "not a PNG or JPEG", "bad_image"),
    ("/files/ok.png", "jpeg", "declared 'jpeg'", "bad_image"),
    ("/files/big.png", "png", f"at most {MAX_IMAGE_BYTES}", "too_large"),  # Content-Length says so
    ("/stream/big.png", "png", f"larger than {MAX_IMAGE_BYTES}", "too_large"),  # found while streaming
    ("/endless", "png", f"larger than {MAX_IMAGE_BYTES}", "too_large"),  # cut off, not read to the end
    ("/redirect?to=http://localhost:1/x.png", "png", "'localhost' is not among the allowed", "not_allowed"),
    ("/slow", "png", "longer than", "timeout"),
])
def test_url_failures_are_400s_naming_the_chunk(server: AssetServer, path: str, fmt: str, message: str,
                                                outcome: str) -> None:
    assets = _resolver(server, timeout=1.0)
    prompt = _prompt(server.url("/files/ok.png"), server.url(path), fmt=fmt)
    prompt["chunks"][1]["format"] = "png"
    with pytest.raises(InvalidRequest, match=message) as info:
        asyncio.run(assets.resolve_prompt(prompt))
    assert str(info.value).startswith("prompt.chunks[2]: ")
    assert _count(assets, "url", outcome) == 1


def test_a_redirect_to_an_allowed_host_is_followed(server: AssetServer) -> None:
    assets = _resolver(server)
    prompt = _prompt(server.url("/redirect?to=" + server.url("/files/ok.png")))
    asyncio.run(assets.resolve_prompt(prompt))
    assert base64.b64decode(prompt["chunks"][1]["data"]) == png()


@pytest.mark.parametrize(("location", "message"), [
    ("http://localhost:{port}/files/ok.png", "'localhost' is not among the allowed"),  # same server, other name
    ("http://127.0.0.1:1/files/ok.png", "is not among the allowed"),  # other port
    ("ftp://127.0.0.1/ok.png", "ftp:// locations are not supported"),
    ("sub/a.png", "no image asset root"),
])
def test_sources_not_configured_or_not_allowed_are_refused(server: AssetServer, location: str, message: str) -> None:
    hits = len(server.hits)
    prompt = _prompt(location.format(port=server.port))
    with pytest.raises(InvalidRequest, match=message):
        asyncio.run(_resolver(server).resolve_prompt(prompt))
    assert len(server.hits) == hits  # nothing was fetched
    with pytest.raises(InvalidRequest, match="no image asset hosts"):
        asyncio.run(_resolver(root=Path("/nonexistent")).resolve_prompt(_prompt(server.url("/files/ok.png"))))


def test_the_request_budget_bounds_all_pointers_together(server: AssetServer) -> None:
    one = len(png())
    assets = _resolver(server, max_request_bytes=one + one // 2)
    with pytest.raises(InvalidRequest, match=r"prompt.chunks\[2\]: .*images together exceed"):
        asyncio.run(assets.resolve_prompt(_prompt(server.url("/files/ok.png"), server.url("/stream/ok.png"))))


def test_pointers_are_refused_at_the_edge_when_off_and_shape_checked_when_on() -> None:
    with pytest.raises(InvalidRequest, match=r"prompt.chunks\[1\]: image_asset_pointer chunks are not served"):
        wire.check_prompt(_prompt("http://example.com/a.png"))
    with pytest.raises(InvalidRequest, match="not supported"):
        wire.check_prompt(_prompt("http://example.com/a.gif", fmt="gif"), pointers=True)
    with pytest.raises(InvalidRequest, match="`location`"):
        wire.check_prompt(_prompt(""), pointers=True)
    with pytest.raises(InvalidRequest, match="more than"):
        wire.check_prompt(_prompt(*["a.png"] * 65), pointers=True)
