"""Pure pool binding: which pool a session gets, names, warm refills, the session status seen from its pool."""

from __future__ import annotations

from tinkerkube_contract import env
from tinkerkube_contract.resource import (
    Condition,
    Endpoint,
    LoraSpec,
    Sampler,
    Sharding,
    TrainerPoolSpec,
    TrainerPoolStatus,
    TrainingSessionSpec,
    TrainingSessionStatus,
)
from tinkerkube_operator import pools
from tinkerkube_operator.manifests import PodConfig, launch_env, pool_ref
from tinkerkube_operator.pools import Choice, PoolView
from tinkerkube_operator.settings import OperatorSettings

M = "tinkerkube/tiny-qwen3"
NOW = "2026-01-01T00:00:00Z"


def _spec(owner: str = "a", rank: int = 8) -> TrainingSessionSpec:
    return TrainingSessionSpec(base_model=M, model_id="s:train:0", owner=owner, lora=LoraSpec(rank=rank))


def _pool(name: str, owner: str = "a", *, phase: str = "Ready", max_runs: int = 2, model: str = M,
          max_rank: int = 512) -> PoolView:
    return PoolView(name, TrainerPoolSpec(base_model=model, owner=owner, max_runs=max_runs, max_lora_rank=max_rank),
                    phase)


def _settings(**kw: object) -> OperatorSettings:
    return OperatorSettings(pools=True, **kw)  # type: ignore[arg-type]


def test_the_fullest_pool_of_the_tenant_with_room_is_used() -> None:
    views = [_pool("p1"), _pool("p2"), _pool("b1", owner="b"), _pool("other", model="x")]
    got = pools.choose(_spec(), views, {"p1": 2, "p2": 1, "b1": 0}, _settings())
    assert got == pools.Binding(Choice.USE, "p2")


def test_tenants_share_only_when_allowed_and_rank_must_fit() -> None:
    views = [_pool("b1", owner="b")]
    assert pools.choose(_spec(), views, {}, _settings()).choice is Choice.CREATE
    assert pools.choose(_spec(), views, {}, _settings(share_pools_across_tenants=True)).pool == "b1"
    small = [_pool("p1", max_rank=4)]
    assert pools.choose(_spec(rank=8), small, {}, _settings()).choice is Choice.CREATE


def test_failed_or_deleting_pools_are_never_chosen() -> None:
    views = [_pool("dead", phase="Failed"), PoolView("going", TrainerPoolSpec(base_model=M, owner="a"), "Ready",
                                                     deleting=True)]
    assert pools.choose(_spec(), views, {}, _settings()).choice is Choice.CREATE


def test_a_warm_pool_is_claimed_ready_ones_first() -> None:
    views = [_pool("w-b", owner="", phase="Starting"), _pool("w-a", owner="", phase="Ready")]
    assert pools.choose(_spec(), views, {}, _settings()) == pools.Binding(Choice.CLAIM, "w-a")


def test_limits_make_a_session_wait_with_a_reason() -> None:
    full = [_pool("p1", max_runs=1)]
    got = pools.choose(_spec(), full, {"p1": 1}, _settings(max_pools_per_tenant=1))
    assert got.choice is Choice.WAIT and got.pool is None and "max_pools_per_tenant" in got.reason
    got = pools.choose(_spec(), full, {"p1": 1}, _settings(max_runs_per_tenant=1))
    assert got.choice is Choice.WAIT and "max_runs_per_tenant" in got.reason
    assert pools.choose(_spec(), full, {"p1": 1}, _settings(max_runs_per_tenant=2)).choice is Choice.CREATE
    warm = [*full, _pool("w", owner="")]  # limits hold for warm pools too
    assert pools.choose(_spec(), warm, {"p1": 1}, _settings(max_runs_per_tenant=1)).choice is Choice.WAIT
    assert pools.choose(_spec(), warm, {"p1": 1}, _settings(max_pools_per_tenant=1)).choice is Choice.WAIT
    assert pools.choose(_spec(), warm, {"p1": 1}, _settings(max_pools_per_tenant=2)).choice is Choice.CLAIM


def test_pool_names_are_short_rfc1035_and_warm_names_deterministic() -> None:
    name = pools.new_pool_name("A Very Long Tenant Name " * 4, "org/" + "m" * 80)
    assert len(name) <= pools.POOL_NAME_MAX and name[0].isalpha() and name == name.lower()
    assert pools.new_pool_name("a", M) != pools.new_pool_name("a", M)
    assert pools.warm_pool_name(M, 0) == pools.warm_pool_name(M, 0) != pools.warm_pool_name(M, 1)


def test_warm_refill_creates_only_what_is_missing() -> None:
    views = [_pool(pools.warm_pool_name(M, 0), owner="a"), _pool(pools.warm_pool_name(M, 1), owner="")]
    missing = pools.warm_missing(views, {M: 2, "other": 1})
    assert missing == [("other", pools.warm_pool_name("other", 0)), (M, pools.warm_pool_name(M, 2))]
    assert pools.warm_missing(views, {M: 1}) == []


def test_a_new_pool_takes_the_session_s_placement_and_the_operator_s_pool_settings() -> None:
    spec = _spec().model_copy(update={"replicas": 2, "node_selector": {"gpu": "a100"}})
    new = pools.pool_spec(spec, _settings(pool_max_runs=3, pool_sharding="fsdp", pool_sampler="vllm"),
                          base_model=M, owner="a")
    assert (new.replicas, new.node_selector, new.max_runs, new.owner) == (2, {"gpu": "a100"}, 3, "a")
    assert new.sharding is Sharding.FSDP and new.sampler is Sampler.VLLM
    env = launch_env(pool_ref("pool-a", "team"), new, PodConfig(image="x"))
    assert env["TINKERKUBE_TRAINER_SHARDING"] == "fsdp" and env["TINKERKUBE_TRAINER_SAMPLER"] == "vllm"
    assert env["TINKERKUBE_TRAINER_MAX_RUNS"] == "3" and "TINKERKUBE_TRAINER_MODEL_ID" not in env


def test_a_pool_keeps_its_pass_journal_on_its_checkpoint_store_across_pod_generations() -> None:
    """Poison ops on a shared pool: the pod that replaces a dead one reads the journal its predecessor left
    (named by the pool, on the durable store); pools never share one; a session's own pods leave it to the run."""
    new = pools.pool_spec(_spec(), _settings(), base_model=M, owner="a")

    def journal(name: str, namespace: str, generation: int = 0) -> str:
        return launch_env(pool_ref(name, namespace, generation), new, PodConfig(image="x"))[env.PASS_JOURNAL]

    assert journal("pool-a", "team", 0) == journal("pool-a", "team", 3)
    assert journal("pool-a", "team").startswith(new.checkpoint_store.mount_path.rstrip("/") + "/.pass-journal/")
    assert len({journal("pool-a", "team"), journal("pool-b", "team"), journal("pool-a", "other")}) == 3
    own = launch_env(pool_ref("sess-1", "team"), _spec(), PodConfig(image="x"))
    assert env.PASS_JOURNAL not in own and own[env.MODEL_ID]


def test_a_session_sees_its_pool_ready_waiting_and_lost() -> None:
    ready = TrainerPoolStatus(conditions=[Condition(type="Ready", status="True", reason="TrainerReady"),
                                          Condition(type="Scheduled", status="True", reason="PodsCreated")],
                              endpoint=Endpoint(url="http://10.0.0.1:8080"), world_size=1)
    bound = pools.bound_status(TrainingSessionStatus(), "p1", ready, now=NOW)
    assert bound.phase == "Ready" and bound.pool == "p1" and bound.endpoint is not None
    waiting = pools.bound_status(TrainingSessionStatus(), None, None, now=NOW, waiting="limit")
    assert waiting.phase == "Pending" and waiting.pool is None and waiting.endpoint is None
    assert next(c for c in waiting.conditions if c.type == "Bound").reason == "WaitingForCapacity"
    lost = pools.bound_status(bound, "p2", TrainerPoolStatus(), now=NOW, lost="p1 deleted")
    assert lost.phase == "Degraded" and lost.endpoint is None
    back = pools.bound_status(lost, "p2", ready, now=NOW)
    assert back.phase == "Ready"
    assert next(c for c in back.conditions if c.type == "Degraded").status == "False"
