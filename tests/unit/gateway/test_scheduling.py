"""Pure ordering rules: contiguous forwarding, restart resume point, replay plans."""

from __future__ import annotations

import pytest

from tinkerkube_gateway.scheduling import first_expected_seq, forwardable, gap, replay_plan


@pytest.mark.parametrize(("next_seq", "present", "expected"), [
    (1, {2, 3}, []),  # chunks 2 and 3 arrived first: wait for 1
    (1, {1, 2, 3}, [1, 2, 3]),  # the first chunk came last: all three go, in order
    (1, {1, 3}, [1]),  # a gap stops the run
    (4, {4, 5, 7}, [4, 5]),
    (1, set(), []),
])
def test_only_the_contiguous_run_from_the_next_seq_is_forwardable(next_seq: int, present: set[int],
                                                                 expected: list[int]) -> None:
    assert forwardable(next_seq, dict.fromkeys(present, "op")) == expected


@pytest.mark.parametrize(("next_seq", "present", "expected"), [
    (2, {4, 5}, [2, 3]),  # ops 4 and 5 wait behind 2 and 3
    (2, {3, 7}, [2]),  # only the hole before the first arrival: what follows it is reached afterwards
    (2, set(), []),  # nothing waits: no gap, whatever is missing
])
def test_the_gap_is_the_hole_before_the_first_waiting_op(next_seq: int, present: set[int],
                                                         expected: list[int]) -> None:
    assert list(gap(next_seq, dict.fromkeys(present, "op"))) == expected


def test_restart_resumes_at_the_first_seq_neither_finished_nor_forwarded() -> None:
    assert first_expected_seq([0, 1, 2]) == 3
    assert first_expected_seq([0, 1, 2, 5]) == 3  # 5 was failed at submit; 3 and 4 still to forward
    assert first_expected_seq([]) == 1


def test_replay_resends_everything_after_the_restore_point() -> None:
    plan = replay_plan(2, {3: True, 4: True, 5: True}, 5)
    assert plan.possible and plan.seq_ids == (3, 4, 5)


def test_replay_is_impossible_without_a_restore_point_or_a_logged_body() -> None:
    assert not replay_plan(None, {1: True}, 1).possible
    plan = replay_plan(0, {1: True, 2: False}, 2)
    assert not plan.possible and "2" in plan.reason


def test_nothing_to_replay_when_the_trainer_restored_everything() -> None:
    plan = replay_plan(5, {}, 5)
    assert plan.possible and plan.seq_ids == ()
