"""Fault injection through the real SDK and real trainer processes (tiny model): a killed pool, a killed
gateway and a hung pool each leave every future resolved and every loss equal to an uninterrupted
twin's (the same run, same seed and data, trained by another tenant on a pool of its own), server-side
custom losses included."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
import tinker
from tinker import types
from tinker.lib.public_interfaces.custom_loss import LossHandle

from tests.support.sdk import GatewayProc, start_gateway
from tinkerkube_contract.models import TINY_QWEN3

pytestmark = pytest.mark.slow
KEYS = '{"tml-victim": "victim", "tml-twin": "twin"}'
STEPS = 6
ENV = {"TINKERKUBE_GATEWAY_API_KEYS": KEYS, "TINKERKUBE_GATEWAY_TRAINER_AUTO_CHECKPOINT_STEPS": "2",
       "TINKERKUBE_GATEWAY_POOL_HANG_SECONDS": "3", "TINKERKUBE_GATEWAY_TRAINER_REQUEST_TIMEOUT_SECONDS": "4"}


def batch(step: int) -> list[types.Datum]:
    out = []
    for i in range(3):
        tokens = [(step * 37 + i * 11 + j * 5) % 350 + 3 for j in range(9 + i)]
        out.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                               loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)}))
    return out


def submit(client: tinker.TrainingClient, step: int, loss: LossHandle | None = None) -> tuple[Future, Future]:
    fb = client.forward_backward(batch(step), "cross_entropy") if loss is None else \
        client.forward_backward_custom(batch(step), loss)
    return fb, client.optim_step(types.AdamParams(learning_rate=0.05))


def train(client: tinker.TrainingClient, steps: range, fault: Callable[[], None] | None = None,
          at: int = -1, loss: LossHandle | None = None) -> list[float]:
    """SFT steps (cross_entropy, or a server-side custom `loss`); `fault` strikes while step `at` is in
    flight. Every future must resolve with a result."""
    losses = []
    for step in steps:
        fb, opt = submit(client, step, loss)
        if step == at and fault is not None:
            fault()
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
    return losses


def new_run(gw: GatewayProc, key: str) -> tinker.TrainingClient:
    service = tinker.ServiceClient(base_url=gw.url, api_key=key)
    return service.create_lora_training_client(base_model=TINY_QWEN3, rank=4, seed=11).result()


def weighted_nll(logprobs, weights):  # a custom loss (traced by torch.fx)
    return -(logprobs * weights).sum(), {"custom/tokens:sum": weights.sum()}


def new_custom_run(gw: GatewayProc, key: str) -> tuple[tinker.TrainingClient, LossHandle]:
    """A run and a server-side custom loss created in its session."""
    service = tinker.ServiceClient(base_url=gw.url, api_key=key)
    run = service.create_lora_training_client(base_model=TINY_QWEN3, rank=4, seed=11).result()
    handle = service.create_custom_loss(weighted_nll, {"logprobs": 1, "weights": 1}).result()
    assert handle.loss_id is not None
    return run, handle


@pytest.fixture
def gateway(tmp_path: Path, tiny_model_dir: Path, model_cache_dir: Path) -> Iterator[GatewayProc]:
    gw = start_gateway(tmp_path / "state", model_cache_dir=model_cache_dir, real_trainer=True, extra_env=ENV)
    yield gw
    gw.stop()


def pool_of(gw: GatewayProc, model_id: str) -> tuple[int, list[int]]:
    """The pool serving `model_id`: its torchrun pid and its ranks' pids."""
    logs = gw.state_dir / "logs"
    for state in logs.glob("*.pool.json"):
        doc = json.loads(state.read_text())
        if model_id in doc["runs"]:
            log = (logs / state.name.replace(".pool.json", ".log")).read_text().splitlines()
            ranks = [json.loads(line)["pid"] for line in log if line.startswith("{") and '"rank started"' in line]
            return int(doc["pid"]), ranks
    raise AssertionError(f"no pool serves {model_id}")


def test_a_killed_pool_loses_no_future_and_changes_no_math(gateway: GatewayProc) -> None:
    twin = train(new_run(gateway, "tml-twin"), range(STEPS))
    victim = new_run(gateway, "tml-victim")
    pid, ranks = pool_of(gateway, victim.model_id)

    def kill_the_ranks() -> None:
        for rank in ranks:
            os.kill(rank, signal.SIGKILL)

    assert train(victim, range(STEPS), kill_the_ranks, at=3) == pytest.approx(twin, rel=1e-5)
    assert pool_of(gateway, victim.model_id)[0] != pid  # served by a new pool


def test_a_killed_pool_replays_a_custom_loss_and_changes_no_math(gateway: GatewayProc) -> None:
    """The replayed ops carry their stored loss: the new pool runs the very graph the dead one ran."""
    run, handle = new_custom_run(gateway, "tml-twin")
    twin = train(run, range(STEPS), loss=handle)
    victim, loss = new_custom_run(gateway, "tml-victim")
    _, ranks = pool_of(gateway, victim.model_id)

    def kill_the_ranks() -> None:
        for rank in ranks:
            os.kill(rank, signal.SIGKILL)

    assert train(victim, range(STEPS), kill_the_ranks, at=3, loss=loss) == pytest.approx(twin, rel=1e-5)


def test_a_hung_pool_is_replaced_and_changes_no_math(gateway: GatewayProc) -> None:
    twin = train(new_run(gateway, "tml-twin"), range(STEPS))
    victim = new_run(gateway, "tml-victim")
    _, ranks = pool_of(gateway, victim.model_id)

    def freeze() -> None:  # it stops answering, with every connection open: a black hole
        for rank in ranks:
            os.kill(rank, signal.SIGSTOP)

    try:
        assert train(victim, range(STEPS), freeze, at=2) == pytest.approx(twin, rel=1e-5)
    finally:
        for rank in ranks:  # the replaced pool's ranks, if anything is left of them
            with contextlib.suppress(ProcessLookupError):
                os.kill(rank, signal.SIGKILL)


class RestartableGateway:
    """A gateway that a test kills (SIGKILL: no clean shutdown) and starts again on the same port and state."""

    def __init__(self, state: Path, model_cache_dir: Path) -> None:
        self._state, self._cache = state, model_cache_dir
        self.gw = start_gateway(state, model_cache_dir=model_cache_dir, real_trainer=True, extra_env=ENV)
        self._port = int(self.gw.url.rsplit(":", 1)[1])

    def restart(self) -> None:
        self.gw.stop(kill=True)
        time.sleep(0.5)
        self.gw = start_gateway(self._state, model_cache_dir=self._cache, real_trainer=True, extra_env=ENV,
                                port=self._port)


@pytest.fixture
def restartable(tmp_path: Path, tiny_model_dir: Path, model_cache_dir: Path) -> Iterator[RestartableGateway]:
    holder = RestartableGateway(tmp_path / "state", model_cache_dir)
    yield holder
    holder.gw.stop()


def test_a_killed_gateway_loses_no_future_and_changes_no_math(restartable: RestartableGateway) -> None:
    twin = train(new_run(restartable.gw, "tml-twin"), range(STEPS))
    victim = new_run(restartable.gw, "tml-victim")
    assert train(victim, range(STEPS), restartable.restart, at=3) == pytest.approx(twin, rel=1e-5)


def test_a_custom_loss_survives_a_killed_gateway(restartable: RestartableGateway) -> None:
    """The loss is in the gateway's store: after a restart the same handle still runs, with the same math."""
    run, handle = new_custom_run(restartable.gw, "tml-twin")
    twin = train(run, range(STEPS), loss=handle)
    victim, loss = new_custom_run(restartable.gw, "tml-victim")
    assert train(victim, range(STEPS), restartable.restart, at=3, loss=loss) == pytest.approx(twin, rel=1e-5)
