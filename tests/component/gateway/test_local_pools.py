"""Local mode on trainer pools, through the real SDK and real trainer processes: a tenant's runs and
samplers of one base model share one pool (one resident model), twins on one pool train identically
whether their ops are co-batched or not, and another tenant never shares it."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tinker
from tinker import types

from tests.component.gateway.conftest import TINY, sft_batch
from tests.support.sdk import GatewayProc, start_gateway

pytestmark = pytest.mark.slow
KEYS = '{"tml-alice": "alice", "tml-bob": "bob"}'


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
            model_cache_dir: Path) -> Iterator[GatewayProc]:
    gw = start_gateway(tmp_path_factory.mktemp("gw-pools") / "state", model_cache_dir=model_cache_dir,
                       real_trainer=True, extra_env={"TINKERKUBE_GATEWAY_API_KEYS": KEYS})
    yield gw
    gw.stop()


def train_steps(client: tinker.TrainingClient, seeds: list[int]) -> list[float]:
    losses = []
    for seed in seeds:
        fb = client.forward_backward(sft_batch(seed), "cross_entropy")
        step = client.optim_step(types.AdamParams(learning_rate=0.05))
        losses.append(fb.result().metrics["loss:sum"])
        step.result()
    return losses


def test_a_tenants_runs_and_samplers_share_one_pool_and_twins_train_alike(gateway: GatewayProc) -> None:
    with tinker.ServiceClient(base_url=gateway.url, api_key="tml-alice") as alice:
        twins = [alice.create_lora_training_client(base_model=TINY, rank=4, seed=3).result() for _ in range(2)]
        other = alice.create_lora_training_client(base_model=TINY, rank=8, seed=9).result()
        pools = gateway.pools()
        assert len(pools) == 1, pools  # one resident base model for all of alice's runs
        (runs,) = pools.values()
        assert {c.model_id for c in [*twins, other]} <= set(runs)
        with ThreadPoolExecutor(3) as pool:  # submitted together: the pool co-batches them
            results = list(pool.map(lambda c: train_steps(c, [1, 2, 3]), [*twins, other]))
        assert results[0] == pytest.approx(results[1], rel=1e-5)  # twins: the same math, co-batched or not
        assert results[2] != pytest.approx(results[0], rel=1e-3)  # another run is another model
        sampler = alice.create_sampling_client(base_model=TINY)
        assert sampler.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2)).result()
        assert len(gateway.pools()) == 1  # the base-model sampler joined the same pool


def test_another_tenant_gets_a_pool_of_its_own(gateway: GatewayProc) -> None:
    before = set(gateway.pools())
    with tinker.ServiceClient(base_url=gateway.url, api_key="tml-bob") as bob:
        run = bob.create_lora_training_client(base_model=TINY, rank=4).result()
        assert train_steps(run, [1])
        new = {name: runs for name, runs in gateway.pools().items() if name not in before}
        assert list(new.values()) == [[run.model_id]]
