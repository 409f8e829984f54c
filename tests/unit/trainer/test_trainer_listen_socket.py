"""The trainer's listening socket: accepted connections must not wait on Nagle's algorithm."""

from __future__ import annotations

import socket

from tinkerkube_trainer.main import _bind


def test_accepted_connections_have_tcp_nodelay() -> None:
    listener = _bind("127.0.0.1", 0)
    try:
        client = socket.create_connection(listener.getsockname()[:2])
        accepted, _ = listener.accept()
        try:
            # Without it every keep-alive reply from uvicorn stalls ~44 ms (Nagle + delayed ACK).
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            accepted.close()
            client.close()
    finally:
        listener.close()
