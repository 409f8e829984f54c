"""status.py: (spec, pods, old status) → new status and the action on the pod set."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tinkerkube_contract.conditions import ConditionType, Phase, Reason
from tinkerkube_contract.resource import FuturesStatus, TrainingSessionSpec, TrainingSessionStatus
from tinkerkube_operator import conditions as cond
from tinkerkube_operator import status
from tinkerkube_operator.manifests import SessionRef
from tinkerkube_operator.podview import PodView, observe
from tinkerkube_operator.status import Action, Observation, Policy

T0 = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = Policy(max_restarts=2, unschedulable_timeout=60, image_pull_timeout=60)
REF = SessionRef("run-a", "team")


def _spec(**kw: Any) -> TrainingSessionSpec:
    return TrainingSessionSpec(base_model="tiny", model_id="s:train:0", owner="t", **kw)


def _pod(rank: int = 0, gen: int = 0, **kw: Any) -> PodView:
    base: dict[str, Any] = {"phase": "Running", "ready": True, "scheduled": True, "ip": f"10.0.0.{rank + 1}",
                            "created": T0}
    return PodView(name=f"run-a-g{gen}-{rank}", namespace="team", session="run-a", rank=rank, generation=gen,
                   **{**base, **kw})


def _derive(pods: list[PodView], old: TrainingSessionStatus | None = None, *, spec: TrainingSessionSpec | None = None,
            now: datetime = T0, generation: int = 1) -> status.Decision:
    obs = Observation(ref=REF, spec=spec or _spec(), old=old or TrainingSessionStatus(), pods=pods, now=now,
                      generation=generation, created=T0)
    return status.derive(obs, POLICY)


def _phase(d: status.Decision) -> Phase:
    return status.phase_of(d.status)


def test_no_pods_yet_is_pending_and_asks_to_create_them() -> None:
    d = _derive([])
    assert _phase(d) == Phase.PENDING and d.action == Action.ENSURE
    assert d.status.observed_generation == 1 and d.status.world_size == 1


def test_scheduled_but_not_ready_is_starting() -> None:
    d = _derive([_pod(ready=False)])
    assert _phase(d) == Phase.STARTING
    assert cond.find(d.status.conditions, ConditionType.READY).reason == Reason.CONTAINER_STARTING
    assert d.status.endpoint is None


def test_ready_rank0_gives_ready_with_its_endpoint() -> None:
    d = _derive([_pod(0), _pod(1)], spec=_spec(replicas=2, procs_per_pod=2))
    assert _phase(d) == Phase.READY and d.status.world_size == 4
    assert d.status.endpoint.url == "http://10.0.0.1:8080" and d.status.endpoint.pod_name == "run-a-g0-0"


def test_ready_waits_for_every_pod_of_the_set() -> None:
    assert _phase(_derive([_pod(0)], spec=_spec(replicas=2))) != Phase.READY


def test_unschedulable_pod_is_reported_then_failed_after_the_timeout() -> None:
    stuck = _pod(ready=False, scheduled=False, phase="Pending", unschedulable="0/1 nodes: Insufficient nvidia.com/gpu")
    early = _derive([stuck], now=T0 + timedelta(seconds=10))
    assert _phase(early) == Phase.PENDING
    assert cond.find(early.status.conditions, ConditionType.SCHEDULED).reason == Reason.UNSCHEDULABLE
    late = _derive([stuck], early.status, now=T0 + timedelta(seconds=61))
    assert _phase(late) == Phase.FAILED and late.action == Action.TEARDOWN
    assert cond.find(late.status.conditions, ConditionType.FAILED).reason == Reason.UNSCHEDULABLE


def test_image_pull_failure_ends_failed_after_the_timeout() -> None:
    pulling = _pod(ready=False, phase="Pending", waiting_reason="ImagePullBackOff", waiting_message="no such image")
    assert _phase(_derive([pulling], now=T0 + timedelta(seconds=5))) == Phase.STARTING
    late = _derive([pulling], now=T0 + timedelta(seconds=120))
    assert cond.find(late.status.conditions, ConditionType.FAILED).reason == Reason.IMAGE_PULL_BACK_OFF


def test_a_failed_pod_degrades_and_recreates_as_the_next_generation() -> None:
    ready = _derive([_pod()]).status
    d = _derive([_pod(phase="Failed", exit_code=137, terminated_reason="Error")], ready)
    assert d.action == Action.RECREATE and _phase(d) == Phase.DEGRADED
    assert d.status.restarts == 1 and d.status.endpoint is None
    degraded = cond.find(d.status.conditions, ConditionType.DEGRADED)
    assert degraded.reason == Reason.POD_FAILED and "137" in degraded.message
    assert [p.name for p in d.current] == ["run-a-g0-0"]


def test_oom_kill_is_named() -> None:
    d = _derive([_pod(phase="Failed", exit_code=137, terminated_reason="OOMKilled")])
    assert cond.find(d.status.conditions, ConditionType.DEGRADED).reason == Reason.OOM_KILLED


def test_a_pod_that_disappears_after_scheduling_is_a_failure() -> None:
    ready = _derive([_pod(0), _pod(1)], spec=_spec(replicas=2)).status
    d = _derive([_pod(0)], ready, spec=_spec(replicas=2))
    assert d.action == Action.RECREATE and "[1]" in cond.find(d.status.conditions, ConditionType.DEGRADED).message


def test_recreated_set_coming_up_clears_degraded_and_ignores_old_generation() -> None:
    degraded = _derive([_pod(phase="Failed", exit_code=1)], _derive([_pod()]).status).status
    starting = _derive([_pod(gen=0, phase="Failed", exit_code=1)], degraded)
    assert starting.action == Action.ENSURE and _phase(starting) == Phase.DEGRADED
    assert [p.name for p in starting.stale] == ["run-a-g0-0"]
    back = _derive([_pod(gen=1)], starting.status)
    assert _phase(back) == Phase.READY
    assert cond.find(back.status.conditions, ConditionType.DEGRADED).status == "False"


def test_retries_exhausted_is_failed_and_sticky() -> None:
    old = TrainingSessionStatus(restarts=2)
    d = _derive([_pod(gen=2, phase="Failed", exit_code=1)], old)
    assert _phase(d) == Phase.FAILED and d.action == Action.TEARDOWN
    failed = cond.find(d.status.conditions, ConditionType.FAILED)
    assert failed.reason == Reason.RETRIES_EXHAUSTED and "exited with code 1" in failed.message
    again = _derive([_pod(gen=2)], d.status, now=T0 + timedelta(hours=1))
    assert _phase(again) == Phase.FAILED and again.action == Action.TEARDOWN


def test_idle_session_is_terminated_and_terminated_is_sticky() -> None:
    spec = _spec(idle_timeout_seconds=30)
    ready = _derive([_pod()], spec=spec).status
    assert _phase(_derive([_pod()], ready, spec=spec, now=T0 + timedelta(seconds=20))) == Phase.READY
    idle = _derive([_pod()], ready, spec=spec, now=T0 + timedelta(seconds=31))
    assert _phase(idle) == Phase.TERMINATED and idle.action == Action.TEARDOWN
    assert cond.find(idle.status.conditions, ConditionType.TERMINATED).reason == Reason.IDLE_TIMEOUT
    assert _phase(_derive([], idle.status, spec=spec)) == Phase.TERMINATED


def test_futures_activity_and_pending_work_keep_a_session_alive() -> None:
    spec = _spec(idle_timeout_seconds=30)
    ready = _derive([_pod()], spec=spec).status
    recent = ready.model_copy(update={"futures": FuturesStatus(updated_at="2026-01-01T00:00:50Z")})
    assert _phase(_derive([_pod()], recent, spec=spec, now=T0 + timedelta(seconds=60))) == Phase.READY
    busy = ready.model_copy(update={"futures": FuturesStatus(pending=1)})
    assert _phase(_derive([_pod()], busy, spec=spec, now=T0 + timedelta(hours=2))) == Phase.READY


def test_zero_idle_timeout_disables_reaping() -> None:
    spec = _spec(idle_timeout_seconds=0)
    assert _phase(_derive([_pod()], spec=spec, now=T0 + timedelta(days=30))) == Phase.READY


def test_differs_ignores_timestamps_but_not_meaning() -> None:
    a = _derive([_pod(ready=False)], now=T0).status
    b = _derive([_pod(ready=False)], now=T0 + timedelta(seconds=5)).status
    assert not status.differs(a, b)
    assert status.differs(a, _derive([_pod()], a).status)


def test_operator_never_writes_the_gateway_subtree() -> None:
    old = TrainingSessionStatus(futures=FuturesStatus(submitted=5), last_checkpoint="tinker://x/weights/a")
    patch = status.status_patch(_derive([_pod()], old).status)
    assert "futures" not in patch and "lastCheckpoint" not in patch
    assert patch["phase"] == "Ready" and "endpoint" in patch


def test_status_patch_nulls_fields_that_went_away() -> None:
    patch = status.status_patch(_derive([_pod(ready=False)]).status)
    assert patch["endpoint"] is None


def test_observe_reads_a_pod_object() -> None:
    pod = {
        "metadata": {"name": "run-a-g1-0", "namespace": "team", "creationTimestamp": "2026-01-01T00:00:00Z",
                     "labels": {"tinkerkube.dev/session": "run-a", "tinkerkube.dev/node-rank": "0",
                                "tinkerkube.dev/pod-generation": "1"}},
        "status": {"phase": "Failed", "podIP": "127.0.0.2",
                   "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}],
                   "containerStatuses": [{"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]},
    }
    v = observe(pod)
    assert (v.session, v.rank, v.generation, v.phase, v.ip) == ("run-a", 0, 1, "Failed", "127.0.0.2")
    assert v.scheduled and not v.ready and v.exit_code == 137 and v.terminated_reason == "OOMKilled"
    assert v.created == T0 and v.exited
