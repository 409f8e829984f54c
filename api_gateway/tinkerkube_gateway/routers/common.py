"""Helpers shared by routers: parse a JSON body into a lenient model, answer a future submit."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

from tinkerkube_gateway.store.records import FutureRecord
from tinkerkube_gateway.wire import parse_json

M = TypeVar("M", bound=BaseModel)


def parse(body: bytes, model: type[M]) -> M:
    return parse_json(body, model)


def submitted(fut: FutureRecord, **extra: Any) -> dict[str, Any]:
    return {"request_id": fut.request_id, "model_id": fut.target_id, **extra}
