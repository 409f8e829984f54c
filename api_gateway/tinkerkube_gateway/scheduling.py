"""Pure ordering rules for one model's ops (no I/O): what may be forwarded now, what to replay.

The SDK numbers each training client's requests 1, 2, 3, ... and sends the chunks of one
forward_backward concurrently, the first chunk last (tinker-protocol.md §2.5). The gateway forwards
strictly in seq_id order: only the contiguous run starting at the next expected seq_id may go.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


def forwardable(next_seq: int, waiting: Mapping[int, T]) -> list[int]:
    """The seq_ids, in order, that can be forwarded now: `next_seq, next_seq+1, ...` while present."""
    run: list[int] = []
    seq = next_seq
    while seq in waiting:
        run.append(seq)
        seq += 1
    return run


def gap(next_seq: int, waiting: Mapping[int, T]) -> range:
    """The hole the waiting ops are stuck behind: the seq_ids from `next_seq` up to the first one that
    arrived (empty when nothing waits, or the next one is there)."""
    return range(next_seq, min(waiting, default=next_seq))


def first_expected_seq(passed: Iterable[int]) -> int:
    """After a gateway restart or a takeover: where a model's dispatcher resumes. Ops are forwarded
    strictly in order, so it is the first seq_id (from 1; create_model is 0) that has neither finished
    nor been forwarded. Not "the lowest pending one": the chunks of one forward_backward arrive first
    chunk last, so seq N+1 may be stored while seq N is still on its way."""
    done = set(passed)
    seq = 1
    while seq in done:
        seq += 1
    return seq


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    seq_ids: tuple[int, ...]  # to re-send, in order
    possible: bool
    reason: str = ""


def replay_plan(last_completed_on_trainer: int | None, logged: Mapping[int, bool], up_to: int) -> ReplayPlan:
    """A trainer restarted and restored its last durable state (`last_completed_on_trainer`); every op
    after it up to `up_to` (the last forwarded seq_id) must be re-sent from the op log. `logged` maps a
    seq_id to whether its body is still in the log. Impossible when the restore point is unknown or
    a needed body is missing: then the caller fails the pending futures with a retryable error."""
    if last_completed_on_trainer is None:
        return ReplayPlan((), False, "the restarted trainer does not report its restore point")
    needed = tuple(range(last_completed_on_trainer + 1, up_to + 1))
    missing = [s for s in needed if not logged.get(s, False)]
    if missing:
        return ReplayPlan((), False, f"ops {missing[:5]} are no longer in the op log")
    return ReplayPlan(needed, True)
