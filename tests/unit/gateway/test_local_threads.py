"""Torch threads of a local pool: the cores but one, shared by its ranks, never zero."""

import pytest

from tinkerkube_gateway.backends.local import local_torch_threads

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("cores", "ranks", "threads"), [
    (1, 1, 1), (2, 1, 1), (2, 2, 1), (8, 1, 7), (8, 2, 3), (64, 8, 7), (4, 8, 1),
])
def test_a_local_pool_leaves_one_core_to_the_gateway(cores: int, ranks: int, threads: int) -> None:
    assert local_torch_threads(cores, ranks) == threads
