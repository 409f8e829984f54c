"""Raw-HTTP helpers for gateway tests that need exact status codes (the SDK hides them behind retries)."""

from __future__ import annotations

import struct
import time
from typing import Any

import httpx
from tinker.proto import tinker_public_pb2 as pb


def retrieve(http: httpx.Client, request_id: str, *, timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = http.post("/api/v1/retrieve_future", json={"request_id": request_id}, timeout=45)
        pending = response.headers.get("content-type", "").startswith("application/json") and \
            response.status_code == 200 and response.json().get("type") == "try_again"
        if not pending or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def result_json(http: httpx.Client, request_id: str) -> dict[str, Any]:
    response = retrieve(http, request_id)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def new_session(http: httpx.Client) -> str:
    response = http.post("/api/v1/create_session", json={"tags": [], "user_metadata": {}, "sdk_version": "test"})
    assert response.status_code == 200, response.text
    return response.json()["session_id"]  # type: ignore[no-any-return]


def new_model(http: httpx.Client, session_id: str, base_model: str, model_seq_id: int = 0) -> str:
    response = http.post("/api/v1/create_model", json={"session_id": session_id, "model_seq_id": model_seq_id,
                                                        "base_model": base_model, "lora_config": {"rank": 4}})
    assert response.status_code == 200, response.text
    return result_json(http, response.json()["request_id"])["model_id"]  # type: ignore[no-any-return]


def fwdbwd_body(model_id: str, seq_id: int, n: int = 4, *, targets: int | None = None, loss_fn: str = "cross_entropy",
                forward_only: bool = False) -> bytes:
    datum = pb.Datum()
    datum.model_input.add().encoded_text.tokens = struct.pack(f"<{n}i", *range(1, n + 1))
    m = n if targets is None else targets
    datum.loss_fn_inputs["target_tokens"].CopyFrom(
        pb.Tensor(dense=struct.pack(f"<{m}q", *range(2, m + 2)), dtype=pb.DTYPE_INT64, shape=[m]))
    datum.loss_fn_inputs["weights"].CopyFrom(
        pb.Tensor(dense=struct.pack(f"<{m}f", *([1.0] * m)), dtype=pb.DTYPE_FLOAT32, shape=[m]))
    req = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn=loss_fn, forward_only=forward_only)
    req.data.append(datum)
    return req.SerializeToString()


def post_fwdbwd(http: httpx.Client, body: bytes) -> httpx.Response:
    return http.post("/api/v1/forward_backward", content=body, headers={"Content-Type": "application/x-protobuf"})


def optim(http: httpx.Client, model_id: str, seq_id: int) -> httpx.Response:
    return http.post("/api/v1/optim_step", json={"model_id": model_id, "seq_id": seq_id,
                                                 "adam_params": {"learning_rate": 1e-4}})


def loss_of(body: bytes) -> float:
    """The `loss:sum` of a forward_backward result (the SDK's protobuf)."""
    from tinker.proto import tinker_public_pb2 as pb

    return float(pb.ForwardBackwardOutput.FromString(body).metrics["loss:sum"])
