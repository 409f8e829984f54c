"""Attaching a run to a trainer pool over the pod API: one implementation for both backends (the local
backend's pools and the Kubernetes backend's TrainerPools).

`PUT /v1/runs/{id}` with the run's `RunSpec`, then long-poll its `RunInfo` until it leaves `attaching`.
Always `resume=True`: a new run has no checkpoint of its own yet, and a run attached again after its pool
died (or to another pool) comes back from its newest durable state; the gateway's worker then replays the
ops after it from the op log.
"""

from __future__ import annotations

import time

from tinkerkube_contract.pod_api import RunInfo, RunSpec, RunState
from tinkerkube_contract.resource import TrainingSessionSpec
from tinkerkube_gateway.backends.base import TrainerHandle, TrainerStartFailed
from tinkerkube_gateway.clients.pod_client import OpRejected, PodClient

INFO_WAIT_SECONDS = 10.0


def run_spec(spec: TrainingSessionSpec) -> RunSpec:
    """The pod API's view of a run."""
    return RunSpec(model_id=spec.model_id, base_model=spec.base_model, mode=spec.mode, lora=spec.lora,
                   restore_from=spec.restore_from, restore_optimizer=spec.restore_optimizer, resume=True)


async def attach_run(pods: PodClient, handle: TrainerHandle, spec: TrainingSessionSpec, deadline: float, *,
                     where: str = "its trainer pool") -> RunInfo:
    """Attach (idempotent) and wait until the run is ready. Raises TrainerStartFailed (refused: a full pool
    is retryable; failed to start), TimeoutError past `deadline` (monotonic), TrainerUnreachable."""
    try:
        info = await pods.attach(handle, run_spec(spec))
    except OpRejected as exc:
        raise TrainerStartFailed(f"{spec.model_id} could not attach to {where}: {exc.detail}",
                                 retryable=exc.status == 429) from exc
    while info.state is RunState.ATTACHING:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{spec.model_id} not attached to {where} in time")
        info = await pods.info(handle, spec.model_id, wait=min(remaining, INFO_WAIT_SECONDS))
    if info.state is RunState.FAILED:
        raise TrainerStartFailed(f"{spec.model_id} could not start on {where}: {info.error}")
    return info
