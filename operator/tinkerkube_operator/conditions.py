"""Condition helpers, like apimachinery's meta.SetStatusCondition: lastTransitionTime moves only on a flip."""

from __future__ import annotations

from collections.abc import Sequence

from tinkerkube_contract.conditions import ConditionType
from tinkerkube_contract.resource import Condition

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"
MAX_MESSAGE = 1024


def find(conditions: Sequence[Condition], kind: ConditionType) -> Condition | None:
    return next((c for c in conditions if c.type == kind), None)


def is_true(conditions: Sequence[Condition], kind: ConditionType) -> bool:
    found = find(conditions, kind)
    return found is not None and found.status == TRUE


def set_condition(conditions: Sequence[Condition], new: Condition, *, now: str) -> list[Condition]:
    """Replace (or append) the condition of `new.type`; keep the old transition time unless status flips."""
    old = find(conditions, ConditionType(new.type))
    flipped = old is None or old.status != new.status
    stamped = new.model_copy(update={
        "last_transition_time": now if flipped else (old.last_transition_time if old else now),
        "message": new.message[:MAX_MESSAGE],
    })
    out = [c for c in conditions if c.type != new.type] + [stamped]
    order = list(ConditionType)
    return sorted(out, key=lambda c: order.index(ConditionType(c.type)))


def remove(conditions: Sequence[Condition], kind: ConditionType) -> list[Condition]:
    return [c for c in conditions if c.type != kind]


def make(kind: ConditionType, status: bool | str, reason: str, message: str = "", *,
         generation: int | None = None) -> Condition:
    value = status if isinstance(status, str) else (TRUE if status else FALSE)
    return Condition(type=kind, status=value, reason=reason, message=message, observed_generation=generation)
