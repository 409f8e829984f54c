"""The trainer client's HTTP/1.1 pool against an in-process asyncio server that scripts each reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tinkerkube_gateway.clients.http11 import Http11Pool, HttpError

Reply = Callable[[bytes, bytes, asyncio.StreamWriter], Awaitable[bool]]  # (head, body, out) -> keep open


class ScriptedServer:
    """Answers each request with `reply`; counts connections and requests; can drop idle connections."""

    def __init__(self, reply: Reply):
        self.reply = reply
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                if not await self.reply(head, body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def drop_idle(self) -> None:
        for writer in self.writers:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Reply], Awaitable[ScriptedServer]]]:
    servers: list[asyncio.Server] = []

    async def start(reply: Reply) -> ScriptedServer:
        scripted = ScriptedServer(reply)
        server = await asyncio.start_server(scripted.handle, "127.0.0.1", 0)
        servers.append(server)
        scripted.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return scripted

    yield start
    for server in servers:
        server.close()


async def ok(head: bytes, body: bytes, out: asyncio.StreamWriter) -> bool:
    payload = b"echo:" + body
    out.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Tinkerkube-Op-State: complete\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    await out.drain()
    return True


async def test_keep_alive_reuses_one_connection_and_headers_are_case_insensitive(serve) -> None:
    server = await serve(ok)
    client = Http11Pool()
    for i in range(3):
        r = await client.request("PUT", server.url + f"/v1/ops/{i}", content=b"x" * i, timeout=5,
                                 headers={"X-Tinkerkube-Op": "optim_step"}, params={"wait": 1.5})
        assert r.status_code == 200 and r.content == b"echo:" + b"x" * i
        assert r.headers.get("x-tinkerkube-op-state") == r.headers["X-TINKERKUBE-OP-STATE"] == "complete"
    await client.aclose()
    assert server.connections == 1
    assert server.requests[2].startswith(b"PUT /v1/ops/2?wait=1.5 HTTP/1.1\r\n")
    assert b"X-Tinkerkube-Op: optim_step\r\n" in server.requests[0]


async def test_an_idle_connection_the_server_dropped_is_replaced_transparently(serve) -> None:
    server = await serve(ok)
    client = Http11Pool()
    assert (await client.request("GET", server.url + "/a", timeout=5)).status_code == 200
    server.drop_idle()
    await asyncio.sleep(0.05)
    assert (await client.request("GET", server.url + "/b", timeout=5)).content == b"echo:"
    await client.aclose()
    assert server.connections == 2


async def test_chunked_and_close_delimited_bodies(serve) -> None:
    async def chunked(head: bytes, body: bytes, out: asyncio.StreamWriter) -> bool:
        out.write(b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
        return True

    async def until_close(head: bytes, body: bytes, out: asyncio.StreamWriter) -> bool:
        out.write(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        return False

    client = Http11Pool()
    first = await serve(chunked)
    r = await client.request("GET", first.url + "/", timeout=5)
    assert (r.status_code, r.content) == (202, b"hello world")
    second = await serve(until_close)
    assert (await client.request("GET", second.url + "/", timeout=5)).content == b"all of it"
    assert (await client.request("GET", second.url + "/", timeout=5)).content == b"all of it"
    await client.aclose()
    assert first.connections == 1 and second.connections == 2  # a close-delimited reply is never reused


async def test_silent_garbled_and_cut_short_replies_raise_transport_errors(serve) -> None:
    async def silent(head: bytes, body: bytes, out: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(10)
        return False

    async def garbled(head: bytes, body: bytes, out: asyncio.StreamWriter) -> bool:
        out.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        return True

    async def cut_short(head: bytes, body: bytes, out: asyncio.StreamWriter) -> bool:
        out.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        return False

    client = Http11Pool()
    with pytest.raises(HttpError, match="mid-response"):
        await client.request("GET", (await serve(cut_short)).url + "/", timeout=5)
    with pytest.raises(TimeoutError):
        await client.request("GET", (await serve(silent)).url + "/", timeout=0.2)
    with pytest.raises(HttpError, match="not an HTTP"):
        await client.request("GET", (await serve(garbled)).url + "/", timeout=5)
    with pytest.raises(HttpError, match="only http://"):
        await client.request("GET", "https://example.invalid/", timeout=5)
    with pytest.raises(OSError):
        await client.request("GET", "http://127.0.0.1:1/", timeout=5)  # nothing listens on port 1
    await client.aclose()
