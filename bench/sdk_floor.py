"""The SDK's own floor: what a `forward` costs when the server does no work at all.

    .venv/bin/python bench/sdk_floor.py --serve PORT --upstream URL   # (started by bench/op_overhead.py)

A raw ASGI app on the same HTTP server stack as the gateway (uvicorn, uvloop, httptools) in a process of its
own. Every request is passed through to the real gateway (`--upstream`) until the hot routes of a `forward`
(the op's POST and `retrieve_future`) have each answered once with a finished result; from then on those two
routes answer from memory with exactly those bytes. An SDK client created through this server therefore sets
itself up for real and then times `forward` against a server that spends nothing on it: no store, no trainer,
no framework. No server can answer the unmodified SDK faster on this machine, so its p50 is the floor under
the per-op latency goal (issue 12) that the gateway's own p50 is read against.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import httpx
import uvicorn

OP_ROUTES = ("/api/v1/forward", "/api/v1/forward_backward")  # the SDK's forward posts to one of them
RETRIEVE_ROUTE = "/api/v1/retrieve_future"
_HOP_HEADERS = {b"host", b"content-length", b"transfer-encoding", b"connection"}


def _request_id(body: bytes) -> str | None:
    try:
        found = json.loads(body).get("request_id")
    except (ValueError, AttributeError):
        return None  # a protobuf body (a result, or an op)
    return found if isinstance(found, str) else None


class FloorApp:
    def __init__(self, upstream: str) -> None:
        self.http = httpx.AsyncClient(base_url=upstream, timeout=httpx.Timeout(120.0, connect=5.0))
        self.recorded: dict[str, tuple[int, list[tuple[bytes, bytes]], bytes]] = {}
        self.op_request_id: str | None = None  # the recorded op's future: its result is the one to record
        self.replayed = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        path = scope["path"]
        if path == "/__floor":
            await self._reply(send, 200, [(b"content-type", b"application/json")],
                              json.dumps({"recorded": sorted(self.recorded), "replayed": self.replayed}).encode())
            return
        if path in self.recorded and RETRIEVE_ROUTE in self.recorded:  # both recorded: replay
            self.replayed += 1
            await self._reply(send, *self.recorded[path])
            return
        await self._proxy(scope, path, body, send)

    async def _proxy(self, scope: dict[str, Any], path: str, body: bytes, send: Any) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_HEADERS]
        url = path + (("?" + scope["query_string"].decode()) if scope["query_string"] else "")
        r = await self.http.request(scope["method"], url, content=body, headers=headers)
        out = [(k.encode(), v.encode()) for k, v in r.headers.items() if k.encode().lower() not in _HOP_HEADERS]
        if scope["method"] == "POST" and r.status_code == 200:
            if path in OP_ROUTES and self.op_request_id is None:
                self.op_request_id = _request_id(r.content)
                self.recorded[path] = (r.status_code, out, r.content)
            elif (path == RETRIEVE_ROUTE and self.op_request_id is not None and _request_id(body) == self.op_request_id
                  and "protobuf" in r.headers.get("content-type", "")):  # the op's result, not a try-again
                self.recorded[path] = (r.status_code, out, r.content)
        await self._reply(send, r.status_code, out, r.content)

    @staticmethod
    async def _reply(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", type=int, required=True, help="port to listen on (127.0.0.1)")
    p.add_argument("--upstream", required=True, help="the real gateway's base URL")
    args = p.parse_args(argv)
    uvicorn.run(FloorApp(args.upstream), host="127.0.0.1", port=args.serve, loop="uvloop", http="httptools",
                log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
