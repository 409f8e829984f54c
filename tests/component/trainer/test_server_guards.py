"""The trainer app refuses what it must, with JSON 4xx, and refusing changes no state."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from tests.support.fakes import MODEL_ID, FakeEngine, fake_trainer, forward_backward_body, json_body
from tinkerkube_contract import pod_api as api
from tinkerkube_contract.pod_api import OpKind
from tinkerkube_trainer.http_api import create_app
from tinkerkube_trainer.server import Booted, RuntimeOptions, TrainerRuntime

FB = OpKind.FORWARD_BACKWARD


async def test_a_missing_or_wrong_token_is_a_401_json_and_probes_stay_open() -> None:
    async with fake_trainer(token="s3cret") as t:
        for headers in ({api.HEADER_TOKEN: "wrong"}, {api.HEADER_TOKEN: ""}):
            for method, path in (("GET", api.INFO_PATH), ("PUT", api.op_path(MODEL_ID, 1)),
                                 ("GET", api.op_path(MODEL_ID, 1)), ("GET", api.sample_path("r"))):
                r = await t.client.request(method, path, headers=headers)
                assert r.status_code == 401, (method, path)
                assert r.json()["code"] == "unauthorized"
        async with httpx.AsyncClient(transport=t.client._transport, base_url="http://trainer") as bare:
            assert (await bare.get(api.INFO_PATH)).status_code == 401
            for path in (api.HEALTH_PATH, api.READY_PATH, api.METRICS_PATH):
                assert (await bare.get(path)).status_code == 200, path
        assert (await t.client.get(api.INFO_PATH)).status_code == 200
        assert t.engine.prepared == []


async def test_no_token_configured_means_no_check() -> None:
    async with fake_trainer(token=None) as t:
        assert (await t.client.get(api.INFO_PATH)).status_code == 200


async def test_an_oversized_body_is_a_413_and_nothing_is_enqueued() -> None:
    async with fake_trainer(max_body_bytes=1000) as t:
        big = forward_backward_body([list(range(400))])
        assert len(big) > 1000
        r = await t.put_op(1, FB, big)
        assert r.status_code == 413 and r.json()["code"] == "body_too_large"

        async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted while streaming
            for _ in range(10):
                yield b"x" * 200

        r = await t.client.put(api.op_path(MODEL_ID, 1), content=chunks(), headers={api.HEADER_OP: "forward_backward"})
        assert r.status_code == 413
        assert t.engine.prepared == [] and (await t.get_op(1)).status_code == 404
        small = forward_backward_body([[1, 2, 3]])
        assert (await t.put_op(1, FB, small)).status_code in (200, 202)  # the seq_id is still free


async def test_bad_input_is_a_4xx_from_prepare_and_leaves_the_seq_id_free() -> None:
    async with fake_trainer() as t:
        cases = [
            (FB, b"\xff\xff\xff not a protobuf", "invalid_protobuf"),
            (FB, forward_backward_body([[1, 2, 3]], loss_fn="no_such_loss"), "unknown_loss"),
            (OpKind.OPTIM_STEP, b'{"adam_params": {"learning_rate": -1}}', "invalid_request"),
            (OpKind.SAVE_STATE, b"{not json", "invalid_request"),
        ]
        for kind, body, code in cases:
            r = await t.put_op(1, kind, body)
            assert r.status_code == 400, (code, r.text)
            assert r.json()["code"] == code and r.json()["category"] == "user" and r.json()["detail"]
        assert (await t.get_op(1)).status_code == 404
        assert t.runtime.scheduler.depth == 0 and t.engine.executed == []
        good = json_body(api.SaveStateOp(name="ok"))
        assert (await t.put_op(1, OpKind.SAVE_STATE, good)).status_code in (200, 202)
        assert (await t.get_op(1, wait=5)).status_code == 200
        assert t.engine.executed == [("save_state", "ok")]


async def test_requests_that_do_not_fit_the_api_are_400_json() -> None:
    async with fake_trainer() as t:
        body = json_body(api.OptimStepOp())
        missing_kind = await t.client.put(api.op_path(MODEL_ID, 1), content=body)
        unknown_kind = await t.put_op(1, OpKind.OPTIM_STEP, body, **{api.HEADER_OP: "launch_rockets"})
        sample_on_op_path = await t.put_op(1, OpKind.SAMPLE, body)
        bad_seq = await t.client.get(f"/v1/models/{MODEL_ID}/ops/abc")
        negative = await t.put_op(-1, OpKind.OPTIM_STEP, body)
        bad_waits = [await t.client.get(api.op_path(MODEL_ID, 1), params={"wait": w}) for w in ("soon", "nan", "-1")]
        for r in (missing_kind, unknown_kind, sample_on_op_path, bad_seq, negative, *bad_waits):
            assert r.status_code == 400, r.text
            assert set(r.json()) == {"detail", "code", "category"}
        assert (await t.client.get("/v1/nowhere")).json()["code"] == "not_found"
        assert t.engine.prepared == []


async def test_before_the_engine_is_ready_ops_get_a_retryable_503() -> None:
    release = threading.Event()
    engine = FakeEngine()

    def slow_boot() -> Booted:
        release.wait(10)
        return Booted(engine, engine.run_pass, engine.run_samples, 1, engine.info())

    boot_run = api.RunSpec(model_id=MODEL_ID, base_model="fake")
    runtime = TrainerRuntime(RuntimeOptions(base_model="fake", boot_run=boot_run), slow_boot)
    app = create_app(runtime)
    await runtime.start()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get(api.HEALTH_PATH)).status_code == 200
        assert (await client.get(api.READY_PATH)).status_code == 503
        r = await client.put(api.op_path(MODEL_ID, 1), content=json_body(api.OptimStepOp()),
                             headers={api.HEADER_OP: "optim_step"})
        assert r.status_code == 503 and r.json()["code"] == "not_ready" and r.headers["x-should-retry"] == "true"
        assert (await client.get(api.INFO_PATH)).json()["ready"] is False
        release.set()
        await asyncio.wait_for(runtime.wait_ready(), 10)
        assert (await client.get(api.READY_PATH)).status_code == 200
    await runtime.stop()


async def test_a_run_whose_attach_killed_the_pool_twice_fails_to_attach_and_the_pool_goes_on(tmp_path: Path) -> None:
    """The journal a pool process left after dying twice while attaching "poisoned" (the second time alone):
    the next process refuses that attach (the run FAILED, `op_crashed_trainer`), attaches another run, and
    serves both the boot run's ops and the new run's."""
    from tinkerkube_trainer.engine_api import PoolOpKind, PreparedOp
    from tinkerkube_trainer.pass_journal import ATTACH_SEQ, CODE, PassJournal

    journal = tmp_path / "pool.json"
    for _ in range(2):
        PassJournal(journal).begin([("poisoned", ATTACH_SEQ)])  # a process killed inside that attach's pass
    async with fake_trainer(pass_journal=journal) as t:
        assert PassJournal(journal).count(PreparedOp(PoolOpKind.ATTACH, None, "poisoned")) == 2
        states = {}
        for model_id in ("poisoned", "healthy"):
            spec = api.RunSpec(model_id=model_id, base_model="fake/base")
            put = await t.client.put(api.run_path(model_id), content=spec.model_dump_json())
            assert put.status_code in (200, 202), put.text
            got = await t.client.get(api.run_path(model_id), params={"wait": 10})
            states[model_id] = api.RunInfo.model_validate(got.json())
        assert states["poisoned"].state is api.RunState.FAILED
        assert CODE in (states["poisoned"].error or "") and "attaching this run" in (states["poisoned"].error or "")
        assert states["healthy"].state is api.RunState.READY
        assert (await t.put_op(1, OpKind.OPTIM_STEP, json_body(api.OptimStepOp()))).status_code in (200, 202)
        assert (await t.get_op(1, wait=5)).status_code == 200
        assert "tinkerkube_trainer_crashed_ops_total 1.0" in (await t.client.get(api.METRICS_PATH)).text
        assert PassJournal(journal).suspects == {}
