"""A small keep-alive HTTP/1.1 client on asyncio streams, for the internal trainer API only.

Why not httpx: every training op costs the gateway one PUT and one long-poll GET to its trainer, and
httpx spends ~1.2 ms of CPU on such a pair on our 2-core machines against ~0.2 ms here (measured with
both against the same uvicorn server), CPU that sits on the critical path of every op and competes
with the trainer for the same cores. The trainer API is ours (tinkerkube_contract.pod_api): plain
`http://` to pod IPs, small bodies, Content-Length or chunked responses, no redirects, no proxies,
no cookies, no TLS. That narrow protocol is all this speaks.

Every request of that API is idempotent (a PUT names its `(model_id, seq_id)` and is deduplicated by
the trainer; the rest are GETs), so a request that fails on a reused keep-alive connection before any
response byte arrived (the server closed it while idle) is retried once on a fresh connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlencode, urlsplit

_MAX_IDLE_PER_ORIGIN = 32
_MAX_HEADER_BYTES = 64 * 1024


class Headers(dict[str, str]):
    """Response headers, looked up case-insensitively (stored lower-cased), as HTTP names are."""

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(name.lower(), default)


class HttpError(Exception):
    """The peer broke the protocol or the connection: the request's outcome is unknown."""


TRANSPORT_ERRORS = (OSError, TimeoutError, HttpError)  # everything `Http11Pool.request` raises for a failed exchange


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status_code: int
    headers: Headers
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


@dataclass(slots=True)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    reused: bool = False

    def usable(self) -> bool:
        return not (self.writer.is_closing() or self.reader.at_eof())

    def close(self) -> None:
        self.writer.close()


@lru_cache(maxsize=1024)
def _split(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise HttpError(f"only http:// URLs with a host are supported, got {url!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, parts.port or 80, target


class Http11Pool:
    def __init__(self, *, connect_timeout: float = 5.0):
        self._connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._closed = False

    async def request(self, method: str, url: str, *, content: bytes = b"", headers: Mapping[str, str] | None = None,
                      params: Mapping[str, object] | None = None, timeout: float) -> HttpResponse:
        """One request/response within `timeout` seconds (connect included); raises OSError, TimeoutError or
        HttpError when no complete response came back."""
        host, port, target = _split(url)
        if params:
            target += ("&" if "?" in target else "?") + urlencode(params)
        head = _request_head(method, target, host, port, len(content), headers or {})
        async with asyncio.timeout(timeout):
            for attempt in (0, 1):
                conn = await self._acquire(host, port)
                try:
                    response, keep = await _exchange(conn, head, content)
                except (OSError, asyncio.IncompleteReadError, HttpError) as exc:
                    conn.close()
                    if attempt == 0 and conn.reused and _nothing_received(exc):
                        continue  # the server dropped an idle keep-alive connection: once more, fresh
                    if isinstance(exc, asyncio.IncompleteReadError):
                        raise HttpError(f"the connection closed mid-response: {exc}") from exc
                    raise
                except BaseException:  # cancelled or timed out mid-exchange: the stream's state is unknown
                    conn.close()
                    raise
                self._release(host, port, conn, keep)
                return response
        raise AssertionError("unreachable")

    async def _acquire(self, host: str, port: int) -> _Conn:
        if self._closed:
            raise HttpError("the client is closed")
        idle = self._idle.get((host, port))
        while idle:
            conn = idle.pop()
            if conn.usable():
                conn.reused = True
                return conn
            conn.close()
        async with asyncio.timeout(self._connect_timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=_MAX_HEADER_BYTES)
        return _Conn(reader, writer)

    def _release(self, host: str, port: int, conn: _Conn, keep: bool) -> None:
        idle = self._idle.setdefault((host, port), [])
        if keep and not self._closed and len(idle) < _MAX_IDLE_PER_ORIGIN and conn.usable():
            idle.append(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()


class _NothingReceived(HttpError):
    pass


def _nothing_received(exc: BaseException) -> bool:
    return isinstance(exc, (_NothingReceived, ConnectionResetError, BrokenPipeError))


def _request_head(method: str, target: str, host: str, port: int, length: int, headers: Mapping[str, str]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {length}"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _exchange(conn: _Conn, head: bytes, body: bytes) -> tuple[HttpResponse, bool]:
    if len(body) < 65536:
        conn.writer.write(head + body)  # one segment for the usual small request
    else:
        conn.writer.writelines((head, body))
    await conn.writer.drain()
    try:
        raw_head = await conn.reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise _NothingReceived("the connection closed before a response") from exc
        raise
    except asyncio.LimitOverrunError as exc:
        raise HttpError("response headers too large") from exc
    status, headers = _parse_head(raw_head)
    if (headers.get("transfer-encoding") or "").lower() == "chunked":
        content = await _read_chunked(conn.reader)
    elif "content-length" in headers:
        content = await conn.reader.readexactly(int(headers["content-length"]))
    elif status in (204, 304) or 100 <= status < 200:
        content = b""
    else:  # delimited by the server closing the connection
        content = await conn.reader.read()
        return HttpResponse(status, headers, content), False
    keep = (headers.get("connection") or "").lower() != "close"
    return HttpResponse(status, headers, content), keep


def _parse_head(raw: bytes) -> tuple[int, Headers]:
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/1."):
        raise HttpError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
    try:
        status = int(rest[:3])
    except ValueError:
        raise HttpError(f"bad status line: {lines[0][:80]!r}") from None
    headers = Headers()
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            dict.__setitem__(headers, name.strip().lower(), value.strip())
    return status, headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise HttpError(f"bad chunk size line {size_line[:40]!r}") from None
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the blank line
                pass
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)

