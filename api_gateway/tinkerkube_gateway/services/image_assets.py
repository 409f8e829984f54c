"""Image asset pointers (`image_asset_pointer` chunks of sampling prompts): resolved to bytes once, at the edge.

Why here and once: the gateway replaces each pointer with an ordinary image chunk (same format and
`expected_tokens`) before the op is stored, so the store, a replay after a crash, co-batching and the trainer
only ever see bytes (the trainer still refuses a raw pointer), and a replay never fetches again: the asset
may have changed or vanished since.

Why everything is off by default: fetching a URL or reading a path on a user's behalf is server-side request
forgery and local file disclosure in a cluster. Two sources, each enabled by its own setting:

* http(s) URLs whose host is in `image_asset_hosts` (`name`, `name:port`, or `*.suffix` for any subdomain),
  fetched directly (no proxy from the environment), redirects followed only to allowed hosts, the body
  streamed and cut off past `MAX_IMAGE_BYTES`;
* paths (relative, absolute, or `file://`) strictly inside `image_asset_root`: no `..`, and the path with its
  symlinks resolved must still lie inside the root (a symlink pointing out is refused).

Fetched bytes meet the bounds of an image sent inline (`tinkerkube_contract.images.check_image`, the declared
format included); a request's pointers share one deadline (`timeout_seconds`) and one byte budget (the body
limit: what the client could have sent inline). Every failure is the user's: a 400 naming the chunk.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from tinkerkube_contract.images import MAX_IMAGE_BYTES, BadImage, check_image
from tinkerkube_gateway.errors import InvalidRequest
from tinkerkube_gateway.metrics import Metrics

POINTER = "image_asset_pointer"
MAX_REDIRECTS = 3
_URL_SCHEMES = ("http", "https")


class AssetRefused(Exception):
    """Why one pointer cannot be resolved; `outcome` labels the fetch metric."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


def parse_host_pattern(entry: str) -> tuple[str, int | None]:
    """`name`, `name:port`, `[v6]:port` or `*.suffix` as (lowercase host pattern, port or None)."""
    entry = entry.strip().lower()
    if not entry or "/" in entry or "@" in entry:
        raise ValueError(f"image asset host {entry!r}: give a host name, host:port or *.suffix")
    split = urlsplit("//" + entry)
    host = split.hostname or ""
    bare = host[2:] if host.startswith("*.") else host
    if not bare or "*" in bare:
        raise ValueError(f"image asset host {entry!r}: '*' only as a leading '*.' (any subdomain)")
    return host, split.port


def host_allowed(host: str, port: int, patterns: tuple[tuple[str, int | None], ...]) -> bool:
    """True when (host, port) matches an allowlist entry: the same name (any port, or the entry's), or a
    subdomain of a `*.suffix` entry (not the suffix itself)."""
    host = host.lower().rstrip(".")
    for pattern, wanted_port in patterns:
        if wanted_port is not None and wanted_port != port:
            continue
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


def path_inside(root: Path, location: str) -> Path:
    """The file a path or file:// location names, strictly inside `root` (resolved); AssetRefused otherwise."""
    path = location
    if location.lower().startswith("file:"):
        split = urlsplit(location)
        if split.netloc not in ("", "localhost"):
            raise AssetRefused("not_allowed", f"file URLs name no host here, got {split.netloc!r}")
        path = unquote(split.path)
    pure = PurePosixPath(path)
    if ".." in pure.parts or "\x00" in path:
        raise AssetRefused("not_allowed", "the path may not contain '..' (or a NUL byte)")
    root = root.resolve()
    candidate = pure if pure.is_absolute() else root / pure
    if not Path(candidate).is_relative_to(root):
        raise AssetRefused("not_allowed", "the path is outside the image asset root")
    try:
        resolved = Path(candidate).resolve(strict=True)
    except (OSError, RuntimeError):
        raise AssetRefused("failed", "no such file under the image asset root") from None
    if not resolved.is_relative_to(root):
        raise AssetRefused("not_allowed", "the path leads outside the image asset root (a symlink)")
    if not resolved.is_file():
        raise AssetRefused("failed", "the path is not a regular file")
    return resolved


def source_of(location: str) -> str:
    """The metric's source label: "url" for http(s), "file" for everything else (paths, file://)."""
    scheme = urlsplit(location).scheme.lower() if "://" in location else ""
    return "url" if scheme in _URL_SCHEMES else "file"


def read_capped(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of a file; AssetRefused when it holds more."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise AssetRefused("too_large", f"the image is larger than {limit} bytes")
    return data


@dataclass(frozen=True, slots=True)
class AssetSources:
    """What pointers may name. Empty hosts and no root: nothing (pointers refused)."""

    hosts: tuple[str, ...] = ()
    root: Path | None = None
    timeout_seconds: float = 10.0
    max_request_bytes: int = 64 * 1024 * 1024  # all images of one request: the body limit

    @property
    def enabled(self) -> bool:
        return bool(self.hosts) or self.root is not None


class ImageAssets:
    """Resolves the pointers of a sampling prompt in place (see the module docstring)."""

    def __init__(self, sources: AssetSources, metrics: Metrics | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.sources = sources
        self.patterns = tuple(parse_host_pattern(h) for h in sources.hosts)
        self.metrics = metrics
        self._transport = transport  # tests may pass one; None: real sockets

    @property
    def enabled(self) -> bool:
        return self.sources.enabled

    async def resolve_prompt(self, prompt: Any) -> None:
        """Replaces every pointer chunk of `prompt` (already shape-checked by wire.check_prompt) with an image
        chunk of the same format and expected_tokens; InvalidRequest naming the chunk otherwise."""
        chunks = prompt.get("chunks") if isinstance(prompt, dict) else None
        pointers = [(j, c) for j, c in enumerate(chunks or []) if isinstance(c, dict) and c.get("type") == POINTER]
        if not pointers:
            return
        budget, where, source = self.sources.max_request_bytes, "prompt", "url"
        try:
            async with asyncio.timeout(self.sources.timeout_seconds):
                for j, chunk in pointers:
                    where, source = f"prompt.chunks[{j}]", source_of(str(chunk["location"]))
                    data = await self._resolve_one(chunk, budget, where)
                    budget -= len(data)
                    chunks[j] = image_chunk(data, chunk)  # type: ignore[index]
        except TimeoutError:
            self._count(source, "timeout", self.sources.timeout_seconds)
            raise InvalidRequest(f"{where}: resolving this request's image asset pointers took longer than "
                                 f"{self.sources.timeout_seconds:g} s") from None

    async def _resolve_one(self, chunk: dict[str, Any], budget: int, where: str) -> bytes:
        location, declared = str(chunk["location"]), str(chunk["format"])
        scheme = urlsplit(location).scheme.lower() if "://" in location else ""
        source = source_of(location)
        started = time.monotonic()
        limit = min(MAX_IMAGE_BYTES, budget)
        try:
            if scheme and scheme not in (*_URL_SCHEMES, "file"):
                raise AssetRefused("not_allowed", f"{scheme}:// locations are not supported; use http(s) or a path")
            data = await (self._fetch_url(location, limit) if source == "url" else self._read_file(location, limit))
            try:
                check_image(data, declared)
            except BadImage as exc:
                raise AssetRefused("bad_image", str(exc)) from None
        except AssetRefused as exc:
            if exc.outcome == "too_large" and limit < MAX_IMAGE_BYTES:  # the request's budget, not the image bound
                exc = AssetRefused("too_large", f"this request's images together exceed "
                                   f"{self.sources.max_request_bytes} bytes")
            self._count(source, exc.outcome, time.monotonic() - started)
            raise InvalidRequest(f"{where}: image_asset_pointer {location[:200]!r}: {exc}") from None
        self._count(source, "ok", time.monotonic() - started)
        return data

    async def _read_file(self, location: str, limit: int) -> bytes:
        if self.sources.root is None:
            raise AssetRefused("disabled", "paths are not served here (no image asset root is configured)")
        path = path_inside(self.sources.root, location)
        return await asyncio.to_thread(read_capped, path, limit)

    def _check_url(self, url: httpx.URL) -> None:
        if not self.patterns:
            raise AssetRefused("disabled", "URLs are not fetched here (no image asset hosts are configured)")
        if url.scheme not in _URL_SCHEMES:
            raise AssetRefused("not_allowed", f"a redirect to a {url.scheme}:// URL")
        port = url.port or (443 if url.scheme == "https" else 80)
        if not host_allowed(url.host, port, self.patterns):
            raise AssetRefused("not_allowed", f"host {url.host!r} is not among the allowed image asset hosts")

    async def _fetch_url(self, location: str, limit: int) -> bytes:
        try:
            url = httpx.URL(location)
        except (httpx.InvalidURL, ValueError) as exc:
            raise AssetRefused("failed", f"not a valid URL: {exc}") from None
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, transport=self._transport,
                                     timeout=self.sources.timeout_seconds) as client:
            for _ in range(MAX_REDIRECTS + 1):
                self._check_url(url)
                try:
                    async with client.stream("GET", url, headers={"accept-encoding": "identity"}) as response:
                        if not response.is_redirect:
                            return await _body(response, limit)
                        url = url.join(response.headers.get("location", ""))
                except httpx.HTTPError as exc:
                    raise AssetRefused("failed", f"fetch failed: {type(exc).__name__}: {exc}") from None
        raise AssetRefused("failed", f"more than {MAX_REDIRECTS} redirects")

    def _count(self, source: str, outcome: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.image_asset_fetches_total.labels(source, outcome).inc()
            self.metrics.image_asset_fetch_seconds.labels(source).observe(seconds)


async def _body(response: httpx.Response, limit: int) -> bytes:
    """A 2xx body of at most `limit` bytes, read as it streams in: an oversized one is cut off, not buffered."""
    if not response.is_success:
        raise AssetRefused("failed", f"the server answered {response.status_code}")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise AssetRefused("too_large", f"the image is {declared} bytes; at most {limit} are accepted")
    parts, size = [], 0
    async for part in response.aiter_bytes():
        size += len(part)
        if size > limit:
            raise AssetRefused("too_large", f"the image is larger than {limit} bytes")
        parts.append(part)
    return b"".join(parts)


def image_chunk(data: bytes, pointer: dict[str, Any]) -> dict[str, Any]:
    """The image chunk (the SDK's JSON form) that replaces `pointer`."""
    chunk: dict[str, Any] = {"type": "image", "data": base64.b64encode(data).decode(), "format": pointer["format"]}
    if pointer.get("expected_tokens") is not None:
        chunk["expected_tokens"] = pointer["expected_tokens"]
    return chunk
