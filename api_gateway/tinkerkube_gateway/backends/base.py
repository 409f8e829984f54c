"""The seam between the gateway's protocol core and where trainers run.

One trainer process group per training run (model) and per sampler that must be started
(DESIGN.md, "What runs where"). The core asks a backend to start/stop them by spec and where to reach
them; the backend owns processes (local) or TrainingSession resources (Kubernetes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tinkerkube_contract.resource import FuturesStatus, TrainingSessionSpec


@dataclass(frozen=True, slots=True)
class TrainerHandle:
    url: str  # base URL of rank 0's internal API, e.g. http://127.0.0.1:41234
    token: str | None = None  # sent as pod_api.HEADER_TOKEN


class TrainerStartFailed(Exception):
    """The trainer can never come up (bad model, unschedulable, retries exhausted). Surfaced to the
    SDK as a failed future; `retryable` says whether trying again later could help."""

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.message = message
        self.retryable = retryable


class SessionBackend(Protocol):
    async def start(self, spec: TrainingSessionSpec) -> None:
        """Begin starting the trainer for `spec.model_id`; returns at once. Idempotent per model_id."""
        ...

    async def wait_ready(self, model_id: str, timeout: float) -> TrainerHandle:
        """Until rank 0 answers readiness. Raises TrainerStartFailed, or TimeoutError."""
        ...

    async def handle(self, model_id: str) -> TrainerHandle | None:
        """Where the trainer is now (it may move after a recreate), or None if it is not running."""
        ...

    async def stop(self, model_id: str) -> None:
        """Release the trainer and everything it holds. Idempotent; unknown ids are fine."""
        ...

    async def mirror_futures(self, model_id: str, futures: FuturesStatus) -> None:
        """Record futures aggregates where operators can see them (the CR status). Called on every
        change; implementations coalesce (at most ~1 write/s per session). Local: no-op."""
        ...

    async def close(self) -> None:
        """Stop everything this backend started (gateway shutdown)."""
        ...
