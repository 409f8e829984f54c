"""conditions.py: set/find like meta.SetStatusCondition; transition time moves only on a flip."""

from __future__ import annotations

from tinkerkube_contract.conditions import ConditionType
from tinkerkube_operator import conditions as cond


def test_transition_time_is_kept_when_only_reason_or_message_change() -> None:
    first = cond.set_condition([], cond.make(ConditionType.READY, False, "PodPending"), now="t1")
    second = cond.set_condition(first, cond.make(ConditionType.READY, False, "ContainerStarting", "m"), now="t2")
    (c,) = second
    assert (c.reason, c.message, c.last_transition_time) == ("ContainerStarting", "m", "t1")


def test_transition_time_moves_on_a_status_flip() -> None:
    first = cond.set_condition([], cond.make(ConditionType.READY, False, "PodPending"), now="t1")
    (c,) = cond.set_condition(first, cond.make(ConditionType.READY, True, "TrainerReady"), now="t2")
    assert c.last_transition_time == "t2" and c.status == "True"


def test_conditions_stay_one_per_type_in_a_stable_order() -> None:
    conds = cond.set_condition([], cond.make(ConditionType.READY, False, "x"), now="t")
    conds = cond.set_condition(conds, cond.make(ConditionType.SCHEDULED, True, "y"), now="t")
    conds = cond.set_condition(conds, cond.make(ConditionType.READY, True, "z"), now="t")
    assert [c.type for c in conds] == ["Scheduled", "Ready"]
    assert cond.is_true(conds, ConditionType.READY) and cond.find(conds, ConditionType.FAILED) is None


def test_messages_are_truncated_to_fit_events_and_etcd() -> None:
    (c,) = cond.set_condition([], cond.make(ConditionType.FAILED, True, "x", "m" * 5000), now="t")
    assert len(c.message) == cond.MAX_MESSAGE


def test_remove_drops_only_that_type() -> None:
    conds = cond.set_condition([], cond.make(ConditionType.READY, True, "x"), now="t")
    conds = cond.set_condition(conds, cond.make(ConditionType.DEGRADED, False, "y"), now="t")
    assert [c.type for c in cond.remove(conds, ConditionType.DEGRADED)] == ["Ready"]
