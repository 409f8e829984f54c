"""Bounds on what a user may send: every integer that reaches the store or a loop, every float that
reaches math, and how deep a JSON body may nest. Pure: checks raise `InvalidRequest` (or ValueError
inside pydantic validators, which the edge turns into one).

Why these numbers: seq_ids are an int32 in the SDK's own protobuf (`ForwardBackwardRequest.seq_id`),
so no real client sends more, and SQLite/PostgreSQL integers overflow at 2**63; TTLs follow the SDK's
documented range (up to 10 years), so an expiry time always stays a date; 64 levels of JSON are far more
than any SDK body nests (4) and far less than what makes a recursive parser blow the stack (~1000).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from tinkerkube_gateway.errors import InvalidRequest

MAX_INT32 = 2**31 - 1
MAX_SEQ_ID = MAX_INT32
MAX_INT64 = 2**63 - 1
# An unpickled SamplingClient numbers its samples from clone_id * 1e9 (clone ids up to 1e9): sample seq_ids
# are 64-bit (the futures' seq_id column is BIGINT).
MAX_SAMPLE_SEQ_ID = MAX_INT64
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
MAX_JSON_DEPTH = 64
# Defaults of the settings of the same name: how long ops wait behind a missing seq_id, how far ahead of
# the next expected seq_id a submit may be, how many tokens one sample request may generate.
SEQ_GAP_TIMEOUT_SECONDS = 300.0
MAX_SEQ_AHEAD = 1000
MAX_SAMPLE_TOKENS = 262_144

SeqId = Annotated[int, Field(ge=1, le=MAX_SEQ_ID)]
Count = Annotated[int, Field(ge=0, le=MAX_INT32)]  # counters and offsets: model_seq_id, sampling seq ids
SampleSeqId = Annotated[int, Field(ge=0, le=MAX_SAMPLE_SEQ_ID)]
TtlSeconds = Annotated[int, Field(ge=0, le=MAX_TTL_SECONDS, description="0 or absent: never expires")]

_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = re.compile(rb"[^\[\]{}]+")


def check_json_depth(raw: bytes, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuses JSON nested deeper than `limit` before a recursive parser sees it. Strings are cut out
    first (a bracket inside one does not nest), then only the brackets are walked: C-speed regexes do
    the bulk, so a large flat body (a long token list) costs almost nothing."""
    depth = 0
    for byte in _NOT_BRACKETS.sub(b"", _STRINGS.sub(b"", raw)):
        depth += 1 if byte in b"[{" else -1
        if depth > limit:
            raise InvalidRequest(f"request body nests deeper than {limit} levels")


def finite_tree(value: Any, where: str = "value") -> Any:
    """`value` unchanged when every float in it is finite (free-form JSON maps: user_metadata, configs);
    ValueError naming the first one that is not. A NaN stored in a JSON column breaks PostgreSQL."""
    stack = [(where, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{path} must be a finite number, got {item}")
        if isinstance(item, dict):
            stack.extend((f"{path}.{k}", v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(item))
    return value


JsonMap = Annotated[dict[str, Any], AfterValidator(finite_tree)]


def check_finite(values: dict[str, float], where: str) -> None:
    for key, number in values.items():
        if not math.isfinite(number):
            raise InvalidRequest(f"{where}[{key!r}] must be a finite number, got {number}")
