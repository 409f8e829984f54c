"""A poison op (one that kills its trainer pool process every time it runs) fails alone: real gateway,
real trainer processes, tiny model. The test is the poison: it SIGKILLs the pool's ranks while a chosen
large forward_backward is in the pass (seen in the pool's pass journal), then again when it is replayed
alone. The op then fails with `op_crashed_trainer`, the run goes on and its math equals a twin that never
had that op, a run sharing the pool is unaffected, and the restart budget (2 here) did not fail the pool."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tinker
from tinker import types
from tinker.types import RequestErrorCategory

from tests.faults.test_recovery import new_run, pool_of, train
from tests.support.sdk import GatewayProc, start_gateway

pytestmark = pytest.mark.slow
KEYS = '{"tml-alice": "alice", "tml-twin": "twin"}'
ENV = {"TINKERKUBE_GATEWAY_API_KEYS": KEYS, "TINKERKUBE_GATEWAY_TRAINER_AUTO_CHECKPOINT_STEPS": "2",
       "TINKERKUBE_GATEWAY_POOL_MAX_RESTARTS": "2"}


@pytest.fixture
def gateway(tmp_path: Path, tiny_model_dir: Path, model_cache_dir: Path) -> Iterator[GatewayProc]:
    gw = start_gateway(tmp_path / "state", model_cache_dir=model_cache_dir, real_trainer=True, extra_env=ENV)
    yield gw
    gw.stop()


def poison() -> list[types.Datum]:
    """A forward_backward big enough that its pass lasts long enough to be caught running."""
    out = []
    for i in range(48):
        tokens = [(i * 13 + j * 7) % 350 + 3 for j in range(512)]
        out.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                               loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 511}))
    return out


def running(gw: GatewayProc) -> list[list[object]]:
    """The ops of the pass now running on any pool, from the pools' journals."""
    out: list[list[object]] = []
    for path in gw.state_dir.rglob(".pass-journal/*.json"):
        try:
            out += json.loads(path.read_text())["running"]
        except (OSError, ValueError):
            continue
    return out


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 300
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never saw {what}")
        time.sleep(0.01)


def kill_when(running: Callable[[], list[list[object]]], kill: Callable[[], None], model_id: str,
              seen: list[list[object]] | None = None) -> list[object]:
    """`kill` the pool once one of `model_id`'s ops is in the pass `running` reads from its journal (`seen`:
    exactly that pass, run by a successor: the dead pool's journal shows it until the successor has read it);
    returns the op. Shared with the emulated-cluster poison test (tests/cluster/test_cluster_poison_op.py)."""
    if seen is not None:
        wait_for(lambda: running() != seen, "the successor read the journal")
    caught: list[list[object]] = []

    def in_pass() -> bool:
        now = running()
        caught[:] = [op for op in now if op[0] == model_id]
        return bool(caught) and (seen is None or now == seen)

    wait_for(in_pass, f"a pass of {model_id} running")
    kill()
    return caught[0]


def sigkill_pool(gw: GatewayProc, model_id: str) -> Callable[[], None]:
    """SIGKILL the ranks of the pool serving `model_id` now (a restarted pool has new ones)."""

    def kill() -> None:
        for rank in pool_of(gw, model_id)[1]:
            os.kill(rank, signal.SIGKILL)

    return kill


def test_an_op_that_kills_its_pool_twice_fails_alone(gateway: GatewayProc) -> None:
    twin = train(new_run(gateway, "tml-twin"), range(4))
    victim, bystander = new_run(gateway, "tml-alice"), new_run(gateway, "tml-alice")
    assert pool_of(gateway, victim.model_id)[0] == pool_of(gateway, bystander.model_id)[0]  # one pool
    assert train(victim, range(2)) == pytest.approx(twin[:2], rel=1e-5)
    assert train(bystander, range(1)) == pytest.approx(twin[:1], rel=1e-5)
    bad = victim.forward_backward(poison(), "cross_entropy")
    journal, kill = (lambda: running(gateway)), sigkill_pool(gateway, victim.model_id)
    op = kill_when(journal, kill, victim.model_id)
    kill_when(journal, kill, victim.model_id, seen=[op])  # replayed alone after the restart: killed again
    with pytest.raises(tinker.RequestFailedError, match="op_crashed_trainer") as failed:
        bad.result()
    assert failed.value.category is RequestErrorCategory.User
    assert victim.model_id in running_runs(gateway)  # the pool is up and still serves it
    assert train(victim, range(2, 4)) == pytest.approx(twin[2:], rel=1e-5)
    assert train(bystander, range(1, 4)) == pytest.approx(twin[1:], rel=1e-5)  # re-attached, unaffected


def running_runs(gw: GatewayProc) -> list[str]:
    logs = gw.state_dir / "logs"
    return [m for state in logs.glob("*.pool.json") for m in json.loads(state.read_text())["runs"]]
