"""What an op used (from its request and result), usage windows, storage GB-hours, audit categories."""

from __future__ import annotations

import dataclasses
import json
import struct
import time
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from tinker.proto import tinker_public_pb2 as pb

from tinkerkube_contract import pod_api
from tinkerkube_gateway.errors import InvalidRequest
from tinkerkube_gateway.services.audit import category_of, entry
from tinkerkube_gateway.services.usage import check_window, storage_hours, usage_of
from tinkerkube_gateway.store.ledger import HOUR, AuditRow
from tinkerkube_gateway.store.records import CheckpointRecord, FutureOp, FutureRecord, FutureState

HOUR_10 = datetime(2026, 11, 30, 10, tzinfo=UTC)


def _future(op: FutureOp, body: bytes | None) -> FutureRecord:
    return FutureRecord(request_id="r", tenant="t", session_id="s", target_id="m", seq_id=1, trainer_seq=None,
                        op=op, state=FutureState.PENDING, body=body, body_type=None, meta=None, result=None,
                        result_type=None, error=None, category=None, created_at=0.0, completed_at=None)


def _ints(tokens: list[int]) -> bytes:
    return struct.pack(f"<{len(tokens)}i", *tokens)


def test_a_forward_backward_uses_its_datums_tokens() -> None:
    msg = pb.ForwardBackwardRequest(model_id="m", seq_id=1)
    for n in (3, 5):
        datum = msg.data.add()
        datum.model_input.add().encoded_text.tokens = _ints(list(range(n)))
    usage = usage_of(_future(FutureOp.FORWARD_BACKWARD, msg.SerializeToString()), None, None)
    assert usage is not None and usage.items == (("training", 8),) and usage.target_id == "m"
    counted = dataclasses.replace(_future(FutureOp.FORWARD_BACKWARD, b"unparsed"), meta={"tokens": 11})
    assert usage_of(counted, None, None).items == (("training", 11),)  # type: ignore[union-attr]


def test_a_sample_uses_its_prompt_and_what_it_generated() -> None:
    body = json.dumps({"prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]},
                                             {"type": "image", "expected_tokens": 4}]}}).encode()
    response = pb.SampleResponse()
    for n in (2, 3):
        response.sequences.add().tokens = _ints(list(range(n)))
    usage = usage_of(_future(FutureOp.SAMPLE, body), response.SerializeToString(), pod_api.CONTENT_PROTOBUF)
    assert usage is not None and usage.items == (("sampling_prefill", 7), ("sampling_sample", 5))
    broken = usage_of(_future(FutureOp.SAMPLE, b"not json"), b"\xff", pod_api.CONTENT_PROTOBUF)
    assert broken is not None and broken.items == (("sampling_prefill", 0), ("sampling_sample", 0))


def test_saves_count_one_checkpoint_and_other_ops_nothing() -> None:
    for op in (FutureOp.SAVE_STATE, FutureOp.SAVE_SAMPLER_WEIGHTS, FutureOp.SAVE_WEIGHTS_EXTERNAL):
        assert usage_of(_future(op, None), None, None).items == (("checkpoint", 1),)  # type: ignore[union-attr]
    for op in (FutureOp.OPTIM_STEP, FutureOp.CREATE_MODEL, FutureOp.LOAD_STATE):
        assert usage_of(_future(op, None), None, None) is None


def test_a_usage_window_is_whole_utc_hours_in_the_past_at_most_14_days_long() -> None:
    now = (HOUR_10 + timedelta(days=30)).timestamp()
    first, end = check_window(HOUR_10, HOUR_10 + timedelta(hours=3), now)
    assert (first, end) == (int(HOUR_10.timestamp() // HOUR), int(HOUR_10.timestamp() // HOUR) + 3)
    naive = check_window(HOUR_10.replace(tzinfo=None), (HOUR_10 + timedelta(hours=1)).replace(tzinfo=None), now)
    assert naive[0] == first  # naive times are UTC
    plus_two = timezone(timedelta(hours=2))
    assert check_window(HOUR_10.astimezone(plus_two), HOUR_10 + timedelta(days=14), now)[0] == first
    bad = [(HOUR_10 + timedelta(minutes=30), HOUR_10 + timedelta(hours=2), "boundary"),
           (HOUR_10, HOUR_10 + timedelta(hours=1, seconds=1), "boundary"),
           (HOUR_10, HOUR_10, "after starting_on"), (HOUR_10, HOUR_10 - timedelta(hours=1), "after starting_on"),
           (HOUR_10, HOUR_10 + timedelta(days=14, hours=1), "14 days"),
           (HOUR_10 + timedelta(days=31), HOUR_10 + timedelta(days=32), "future")]
    for start, end_at, why in bad:
        with pytest.raises(InvalidRequest, match=why):
            check_window(start, end_at, now)


def test_storage_is_the_gigabyte_hours_each_checkpoint_existed_in_each_hour() -> None:
    t0 = HOUR_10.timestamp()
    made = CheckpointRecord(tinker_path="tinker://m/weights/a", run_id="m", tenant="t", kind="weights", name="a",
                            size_bytes=2_000_000_000, public=False, created_at=t0 + HOUR / 2, expires_at=None,
                            user_metadata=None)
    empty = CheckpointRecord(tinker_path="tinker://m/weights/b", run_id="m", tenant="t", kind="weights", name="b",
                             size_bytes=0, public=False, created_at=t0, expires_at=None, user_metadata=None)
    first = int(t0 // HOUR)
    hours = storage_hours([made, empty], first, first + 3, now=t0 + 2 * HOUR + HOUR / 4)
    assert hours == pytest.approx({(first, "m"): 1.0, (first + 1, "m"): 2.0, (first + 2, "m"): 0.5})
    assert storage_hours([made], first + 5, first + 6, now=time.time()) == pytest.approx({(first + 5, "m"): 2.0})


def test_audit_entries_are_classed_as_the_sdk_asks_and_checkpoint_ones_fill_the_old_fields() -> None:
    assert [category_of(e) for e in ("checkpoint_delete", "project_set", "session_create", "api_key_revoke")] == [
        "checkpoints", "projects", "organizations", "organizations"]
    at = HOUR_10.timestamp()
    ck = entry(AuditRow(at, "checkpoint_delete", "checkpoints", {"model_id": "m", "tinker_path": "tinker://m/w/a"}))
    assert ck == {"timestamp": HOUR_10.isoformat(), "event": "checkpoint_delete", "model_id": "m",
                  "tinker_path": "tinker://m/w/a", "event_details": {"model_id": "m", "tinker_path": "tinker://m/w/a"}}
    assert "model_id" not in entry(AuditRow(at, "project_set", "projects", {"model_id": "m"}))
    assert date(2026, 11, 30) == datetime.fromisoformat(ck["timestamp"]).date()
