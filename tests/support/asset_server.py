"""A real local HTTP server for image asset pointer tests: `http.server` in a thread on 127.0.0.1.

Paths it serves: `/files/<name>` (the bytes registered under `name`, with a Content-Length), `/stream/<name>`
(the same bytes, no Content-Length: a chunked body whose size only shows while it is read), `/endless`
(chunks forever, no Content-Length: only a reader that cuts it off returns), `/slow` (headers, then silence),
`/redirect?to=<url>` (a 302), anything else a 404. It counts the requests it got, so a test can tell a fetch
from a replay that did not fetch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class AssetServer:
    port: int
    files: dict[str, bytes] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def _handler(server: AssetServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            server.hits.append(self.path)
            path = urlsplit(self.path)
            kind, _, name = path.path.strip("/").partition("/")
            if kind == "files" and name in server.files:
                self._send(server.files[name], length=True)
            elif kind == "stream" and name in server.files:
                self._send(server.files[name], length=False)
            elif kind == "endless":
                self._endless()
            elif kind == "slow":
                self._slow()
            elif kind == "redirect":
                self.send_response(302)
                self.send_header("Location", parse_qs(path.query)["to"][0])
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._send(b"not found", length=True, status=404)

        def _send(self, data: bytes, *, length: bool, status: int = 200) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            if length:
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(data), 65536):
                part = data[start:start + 65536]
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")

        def _endless(self) -> None:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            part = b"\x89PNG" + b"\x00" * 65532
            try:
                for _ in range(100_000):  # ~6.5 GB: a reader without a cut-off would not come back soon
                    self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            except OSError:  # the reader hung up: the point of the test
                pass

        def _slow(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            time.sleep(5)

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """Quiet: the tests hang up on purpose (a body cut off, a timeout)."""


@contextmanager
def asset_server() -> Iterator[AssetServer]:
    state = AssetServer(port=0)
    httpd = _Server(("127.0.0.1", 0), _handler(state))
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
