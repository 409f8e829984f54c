"""Helpers shared by routers: parse a JSON body into a lenient model, answer a future submit, list pages."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Query
from pydantic import BaseModel

from tinkerkube_gateway.bounds import MAX_INT32
from tinkerkube_gateway.store.records import FutureRecord
from tinkerkube_gateway.wire import parse_json

M = TypeVar("M", bound=BaseModel)
Limit = Query(100, ge=1, le=1000)  # the REST list calls' page
Offset = Query(0, ge=0, le=MAX_INT32)


def parse(body: bytes, model: type[M]) -> M:
    return parse_json(body, model)


def submitted(fut: FutureRecord, **extra: Any) -> dict[str, Any]:
    return {"request_id": fut.request_id, "model_id": fut.target_id, **extra}
