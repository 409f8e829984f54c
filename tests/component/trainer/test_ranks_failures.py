"""Real torchrun groups (FakeEngine ranks: no model to load) fail as a unit and never hang.

A rank that dies, idle or inside an op, takes the whole group down with a non-zero exit, on one node
or across two; an OpError raised alike on every rank only fails that op; SIGTERM to rank 0 stops the
group cleanly (the other ranks get a stop message and every process exits 0).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.fakes import forward_backward_body, json_body
from tests.support.trainer_proc import ENGINE_FACTORY_VAR, FAKE_ENGINE, TrainerGroup, trainer_group
from tinkerkube_contract import pod_api as api
from tinkerkube_contract.env import PREFIX
from tinkerkube_contract.pod_api import OpKind
from tinkerkube_contract.resource import TrainingSessionSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

EXIT_WITHIN = 30.0  # seconds: "no hang" means the group is gone well before any collective timeout
SPEC = TrainingSessionSpec(base_model="fake/base", model_id="sess-fail:train:0", owner="tests")
FAST_ENV = {ENGINE_FACTORY_VAR: FAKE_ENGINE, PREFIX + "HEARTBEAT_SECONDS": "0.5"}


def save(name: str) -> bytes:
    return json_body(api.SaveStateOp(name=name))


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[object]:
    def _launch(nnodes: int = 1, nproc_per_node: int = 2) -> object:
        return trainer_group(SPEC, checkpoint_dir=tmp_path / "ckpt", model_cache_dir=tmp_path / "models",
                             nnodes=nnodes, nproc_per_node=nproc_per_node, extra_env=FAST_ENV,
                             log_dir=tmp_path / "logs", ready_timeout=60)
    yield _launch


def assert_all_exit_nonzero(group: TrainerGroup) -> None:
    started = time.monotonic()
    codes = group.wait_exit(EXIT_WITHIN)
    assert all(c is not None for c in codes), f"still running after {EXIT_WITHIN}s: {codes}\n{group.logs()[-3000:]}"
    assert all(c != 0 for c in codes), f"exit codes {codes}"
    assert time.monotonic() - started < EXIT_WITHIN


def test_killing_an_idle_rank_takes_the_whole_group_down(launch) -> None:
    with launch(nproc_per_node=2) as group:
        os.kill(group.worker_pids()[1], signal.SIGKILL)
        assert_all_exit_nonzero(group)
        with pytest.raises(httpx.HTTPError):
            httpx.get(group.url + api.HEALTH_PATH, timeout=2)


def test_a_rank_crashing_inside_an_op_fails_the_group_but_a_shared_op_error_does_not(launch) -> None:
    with launch(nproc_per_node=2) as group:
        client = group.client(timeout=30)
        failed = client.put_op(1, OpKind.SAVE_STATE, save("fail-user")) and client.get_op(1, wait=10)
        assert failed.headers[api.HEADER_OP_STATE] == "failed" and failed.json()["category"] == "user"
        assert client.run(2, OpKind.FORWARD_BACKWARD, forward_backward_body([[1, 2, 3], [4, 5]])).status_code == 200

        client.put_op(3, OpKind.SAVE_STATE, save("crash-rank-1"))
        assert_all_exit_nonzero(group)
        assert "a rank failed inside a pass" in group.logs()


def test_when_rank_0_dies_the_other_pod_exits_too(launch) -> None:
    # (the other side, a pod's rank dying while rank 0 idles, is in test_ranks_nodes with the real engine)
    with launch(nnodes=2, nproc_per_node=1) as group:  # rank 1 lives in the second torchrun ("pod")
        client = group.client(timeout=30)
        assert client.run(1, OpKind.FORWARD_BACKWARD, forward_backward_body([[1, 2, 3], [4, 5]])).status_code == 200
        os.kill(group.worker_pids()[0], signal.SIGKILL)  # rank 0 (and its HTTP server) gone
        assert_all_exit_nonzero(group)
        assert "lost rank 0" in group.logs()


def test_sigterm_to_rank_0_stops_every_rank_cleanly(launch) -> None:
    with launch(nproc_per_node=2) as group:
        client = group.client(timeout=30)
        client.put_op(1, OpKind.SAVE_STATE, save("sleep-1"))  # running when the signal lands: it finishes
        time.sleep(0.3)
        os.kill(group.worker_pids()[0], signal.SIGTERM)
        codes = group.wait_exit(EXIT_WITHIN)
        assert codes == [0], f"{codes}\n{group.logs()[-3000:]}"
        events = [e["event"] for e in group.events()]
        assert "stop received" in events and "stopped" in events
        finished = [e for e in group.events("op finished") if e["key"] == 1]
        assert finished and finished[0]["state"] == "complete"
