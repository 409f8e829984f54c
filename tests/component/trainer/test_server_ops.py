"""The trainer app in process (httpx.ASGITransport) over a FakeEngine: ops, samples, long-poll, info, metrics."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from tests.support.fakes import MODEL_ID, fake_trainer, forward_backward_body, json_body
from tinkerkube_contract import pod_api as api
from tinkerkube_contract.pod_api import OpKind

FB = OpKind.FORWARD_BACKWARD


def optim(lr: float = 1e-4) -> bytes:
    return json_body(api.OptimStepOp(adam_params=api.AdamParams(learning_rate=lr)))


def save(name: str) -> bytes:
    return json_body(api.SaveStateOp(name=name))


async def test_forward_backward_result_is_the_protobuf_and_stays_readable() -> None:
    async with fake_trainer() as t:
        put = await t.put_op(1, FB, forward_backward_body([[1, 2, 3, 4], [5, 6, 7]]))
        assert put.status_code in (200, 202)
        for _ in range(2):  # never popped on read
            got = await t.get_op(1, wait=5)
            assert got.status_code == 200, got.text
            assert got.headers[api.HEADER_OP_STATE] == "complete"
            assert got.headers["content-type"] == api.CONTENT_PROTOBUF
            out = deserialize_forward_backward_output(got.content)
            assert [o["logprobs"].shape for o in out.loss_fn_outputs] == [[3], [2]]
            assert out.metrics["loss:sum"] == 5.0


async def test_ops_submitted_out_of_order_run_in_seq_order() -> None:
    async with fake_trainer() as t:
        bodies = {1: save("a"), 2: save("b"), 3: save("c"), 4: optim()}
        for seq in (3, 4, 2):
            assert (await t.put_op(seq, OpKind.OPTIM_STEP if seq == 4 else OpKind.SAVE_STATE,
                                   bodies[seq])).status_code == 202
        pending = await t.get_op(3, wait=0.1)
        assert pending.status_code == 202 and pending.json() == {"state": "pending", "queue_position": 2}
        await t.put_op(1, OpKind.SAVE_STATE, bodies[1])
        assert (await t.get_op(4, wait=5)).status_code == 200
        assert [label for _, label in t.engine.executed] == ["a", "b", "c", None]


async def test_long_poll_holds_until_done_and_returns_pending_when_time_is_up() -> None:
    gate = threading.Event()
    async with fake_trainer(gate=gate) as t:
        await t.put_op(1, OpKind.SAVE_STATE, save("slow"))
        started = time.monotonic()
        pending = await t.get_op(1, wait=0.3)
        assert 0.25 <= time.monotonic() - started < 3
        assert pending.status_code == 202 and pending.headers[api.HEADER_OP_STATE] == "pending"
        assert pending.json()["queue_position"] == 0

        waiter = asyncio.create_task(t.get_op(1, wait=20))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        gate.set()
        done = await asyncio.wait_for(waiter, 10)
        assert done.status_code == 200 and time.monotonic() - started < 2


async def test_wait_is_capped_by_the_max_wait() -> None:
    gate = threading.Event()
    async with fake_trainer(gate=gate, max_wait_seconds=0.2) as t:
        await t.put_op(1, OpKind.SAVE_STATE, save("slow"))
        started = time.monotonic()
        assert (await t.get_op(1, wait=600)).status_code == 202
        assert time.monotonic() - started < 3
        gate.set()


async def test_resubmitting_the_same_op_is_a_no_op() -> None:
    async with fake_trainer() as t:
        body = forward_backward_body([[1, 2, 3]])
        first = await t.put_op(1, FB, body)
        assert first.status_code in (200, 202)
        assert (await t.get_op(1, wait=5)).status_code == 200
        again = await t.put_op(1, FB, body)
        assert again.status_code == 200 and again.headers[api.HEADER_OP_STATE] == "complete"
        assert len(t.engine.executed) == 1


async def test_a_different_op_under_a_used_seq_id_is_a_400_seq_id_reused() -> None:
    async with fake_trainer() as t:
        await t.put_op(1, FB, forward_backward_body([[1, 2, 3]]))
        for kind, body in ((FB, forward_backward_body([[9, 9, 9]])), (OpKind.OPTIM_STEP, optim())):
            reused = await t.put_op(1, kind, body)
            assert reused.status_code == 400
            assert reused.json() == {"detail": reused.json()["detail"], "code": "seq_id_reused", "category": "user"}
        assert (await t.get_op(1, wait=5)).status_code == 200
        assert len(t.engine.executed) == 1


async def test_a_failed_op_is_a_200_op_failure_with_its_category() -> None:
    async with fake_trainer() as t:
        await t.put_op(1, OpKind.SAVE_STATE, save("fail-user"))
        await t.put_op(2, OpKind.SAVE_STATE, save("crash"))
        await t.put_op(3, OpKind.SAVE_STATE, save("fine"))
        user, server, fine = [await t.get_op(s, wait=5) for s in (1, 2, 3)]
        assert user.status_code == 200 and user.headers[api.HEADER_OP_STATE] == "failed"
        assert user.json() == {"error": "asked to fail", "category": "user"}
        assert server.headers[api.HEADER_OP_STATE] == "failed" and server.json()["category"] == "server"
        assert fine.headers[api.HEADER_OP_STATE] == "complete"


async def test_unknown_ops_models_and_stale_seq_ids_are_clear_4xx() -> None:
    async with fake_trainer(last_completed_seq_id=10) as t:
        missing = await t.get_op(11)
        assert missing.status_code == 404 and missing.json()["code"] == "unknown_op"
        other = await t.client.get(api.op_path("sess-other:train:0", 11))
        assert other.status_code == 404 and other.json()["code"] == "unknown_model"
        stale = await t.put_op(10, OpKind.OPTIM_STEP, optim())
        assert stale.status_code == 400 and stale.json()["code"] == "seq_id_stale"
        assert (await t.put_op(11, OpKind.OPTIM_STEP, optim())).status_code in (200, 202)
        assert (await t.get_op(11, wait=5)).status_code == 200


async def test_info_reports_identity_readiness_and_progress() -> None:
    async with fake_trainer(last_completed_seq_id=4) as t:
        pool = api.PoolInfo.model_validate((await t.client.get(api.INFO_PATH)).json())
        assert pool.ready and pool.runs == [MODEL_ID] and pool.world_size == 1 and pool.vocab_size == 128
        info = api.RunInfo.model_validate((await t.client.get(api.run_path(MODEL_ID))).json())
        assert info.model_id == MODEL_ID and info.ready and info.state == "ready" and info.world_size == 1
        assert uuid.UUID(info.boot_id) and info.last_completed_seq_id == 4 and info.vocab_size == 128
        await t.put_op(5, OpKind.OPTIM_STEP, optim())
        await t.get_op(5, wait=5)
        info = api.RunInfo.model_validate((await t.client.get(api.run_path(MODEL_ID))).json())
        assert info.last_completed_seq_id == 5
    async with fake_trainer() as other:  # a fresh start is a fresh boot id
        again = api.RunInfo.model_validate((await other.client.get(api.run_path(MODEL_ID))).json())
        assert again.boot_id != info.boot_id


async def test_samples_are_keyed_by_request_id_and_return_the_sample_protobuf() -> None:
    async with fake_trainer() as t:
        op = api.SampleOp(request={"num_samples": 2, "sampling_params": {"max_tokens": 3},
                                   "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}})
        assert (await t.put_sample("req-1", op)).status_code in (200, 202)
        got = await t.get_sample("req-1", wait=5)
        assert got.status_code == 200 and got.headers["content-type"] == api.CONTENT_PROTOBUF
        resp = deserialize_sample_response(got.content)
        assert [s.tokens for s in resp.sequences] == [[0, 1, 2], [0, 1, 2]]
        assert (await t.put_sample("req-1", op)).status_code == 200
        other = api.SampleOp(request={"num_samples": 1})
        reused = await t.put_sample("req-1", other)
        assert reused.status_code == 400 and reused.json()["code"] == "seq_id_reused"
        assert (await t.get_sample("nope")).status_code == 404


async def test_metrics_count_ops_tokens_and_memory() -> None:
    async with fake_trainer() as t:
        await t.put_op(1, FB, forward_backward_body([[1, 2, 3, 4], [5, 6, 7]]))
        await t.put_op(2, OpKind.SAVE_STATE, save("fail-user"))
        await t.get_op(2, wait=5)
        text = (await t.client.get(api.METRICS_PATH)).text
        assert 'tinkerkube_trainer_ops_total{op="forward_backward",outcome="complete"} 1.0' in text
        assert 'tinkerkube_trainer_ops_total{op="save_state",outcome="failed"} 1.0' in text
        assert 'tinkerkube_trainer_op_seconds_count{op="forward_backward"} 1.0' in text
        assert 'tinkerkube_trainer_tokens_total{op="forward_backward"} 5.0' in text
        assert "tinkerkube_trainer_queue_depth 0.0" in text
        rss = next(line for line in text.splitlines() if line.startswith('tinkerkube_trainer_memory_bytes{kind="rss"}'))
        assert float(rss.split()[-1]) > 10e6
