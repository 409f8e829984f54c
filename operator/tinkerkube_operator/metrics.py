"""Prometheus metrics of the operator (served on OperatorSettings.metrics_port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("tinkerkube_operator_reconciles_total", "TrainingSession reconciliations")
RECONCILE_ERRORS = Counter("tinkerkube_operator_reconcile_errors_total", "Reconciliations that raised")
SESSIONS = Gauge("tinkerkube_operator_sessions", "TrainingSessions by phase", ["phase"])
TIME_TO_READY = Histogram(
    "tinkerkube_operator_time_to_ready_seconds", "From creation to first Ready",
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600),
)

BIND_WAIT = Histogram(
    "tinkerkube_operator_bind_wait_seconds", "From a TrainingSession's creation to its binding to a TrainerPool "
    "(the queue wait of a run waiting for capacity)",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
POOL_RUNS = Gauge("tinkerkube_operator_pool_runs", "Runs (TrainingSessions) bound to each TrainerPool", ["pool"])


class PhaseBook:
    """Tracks each session's phase so the gauge is a true count, not a running tally."""

    def __init__(self) -> None:
        self._phases: dict[tuple[str, str], str] = {}

    def set(self, key: tuple[str, str], phase: str | None) -> None:
        old = self._phases.pop(key, None)
        if phase:
            self._phases[key] = phase
        for value in {old, phase} - {None}:
            SESSIONS.labels(phase=value).set(sum(1 for p in self._phases.values() if p == value))
