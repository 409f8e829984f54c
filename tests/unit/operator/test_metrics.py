"""metrics.py: the sessions gauge is a true count per phase, not a running tally."""

from __future__ import annotations

from prometheus_client import REGISTRY

from tinkerkube_operator.metrics import PhaseBook


def _gauge(phase: str) -> float:
    return REGISTRY.get_sample_value("tinkerkube_operator_sessions", {"phase": phase}) or 0.0


def test_sessions_gauge_counts_current_phases() -> None:
    book = PhaseBook()
    book.set(("ns", "a"), "Starting")
    book.set(("ns", "b"), "Starting")
    book.set(("ns", "a"), "Ready")
    assert (_gauge("Starting"), _gauge("Ready")) == (1, 1)
    book.set(("ns", "b"), None)  # deleted
    assert (_gauge("Starting"), _gauge("Ready")) == (0, 1)
    book.set(("ns", "a"), "Ready")  # unchanged phase: still counted once
    assert _gauge("Ready") == 1
