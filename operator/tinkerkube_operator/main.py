"""The operator's composition root.

Two ways to run it, same handlers:
- `kopf run -m tinkerkube_operator.main [--namespace ...]` (kopf's CLI; settings from env), or
- `python -m tinkerkube_operator.main` / `main()`: embeds `kopf.operator()` with peering, so several
  replicas can run and only the one with the highest priority works (the others stand by).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from typing import Any

import kopf
import prometheus_client

from tinkerkube_contract.resource import FINALIZER, GROUP
from tinkerkube_operator import (
    binding,
    handlers,  # noqa: F401  (registers the handlers)
    leader,
)
from tinkerkube_operator.kube import Kube, api_client
from tinkerkube_operator.reconciler import Context
from tinkerkube_operator.settings import OperatorSettings

_metrics_started: set[int] = set()


def build_context(settings: OperatorSettings) -> Context:
    return Context.build(settings, Kube(api_client(settings.api_url)))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """kopf's own settings: our finalizer/annotation prefixes, event level, watch timeouts."""
    if getattr(memo, "ctx", None) is None:  # `kopf run -m`: read our settings here, once
        memo.ctx = build_context(OperatorSettings())
    ours: OperatorSettings = memo.ctx.settings
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.getLevelName(ours.posting_level)
    settings.watching.server_timeout = ours.watch_server_timeout
    settings.watching.client_timeout = ours.watch_client_timeout
    # Peering (standalone, name, priority) comes from kopf.operator()'s arguments in `run()`, or from
    # `kopf run`'s own flags (--standalone | --peering=NAME --priority=N): not overridden here.
    settings.execution.max_workers = 16
    if ours.metrics_port and ours.metrics_port not in _metrics_started:
        prometheus_client.start_http_server(ours.metrics_port)
        _metrics_started.add(ours.metrics_port)


@kopf.on.startup()
async def start_warm_pools(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Warm pools are topped up by a loop of their own: no object exists to hang a timer on when there are none
    (and a daemon would put its finalizer on whatever it runs on). A startup task is not paused on non-leaders
    as handlers are, so the loop asks the peering object whether this replica leads (`leader`) and only the
    leader refills; deterministic names still make a race at a failover create one pool, not two."""
    ctx: Context = memo.ctx
    if ctx.settings.pools and ctx.settings.warm_pools:
        peering = leader.Peering.from_kopf(settings, ctx.settings.namespaces)
        memo.warm_task = asyncio.create_task(binding.warm_loop(ctx, peering), name="warm-pools")


@kopf.on.login()
def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    url = memo.ctx.settings.api_url if getattr(memo, "ctx", None) is not None else None
    if url:
        return kopf.ConnectionInfo(server=url, insecure=True)
    return kopf.login_via_client(**kwargs)


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, **_: Any) -> None:
    task = getattr(memo, "warm_task", None)
    if task is not None:
        task.get_loop().call_soon_threadsafe(task.cancel)
    memo.ctx.kube.close()


def _priority(settings: OperatorSettings) -> int:
    """Replicas with equal priorities would all pause; a random one per start makes exactly one leader."""
    return settings.peering_priority if settings.peering_priority is not None else random.randint(1, 2**31 - 1)


async def run(settings: OperatorSettings, *, stop_flag: asyncio.Event | threading.Event | None = None,
              ready_flag: asyncio.Event | threading.Event | None = None) -> None:
    """Embedded operator (tests run this as a task; `main()` runs it as the process)."""
    namespaces = settings.namespaces
    await kopf.operator(
        clusterwide=not namespaces, namespaces=namespaces, standalone=settings.standalone,
        peering_name=None if settings.standalone else settings.peering_name, priority=_priority(settings),
        memo=kopf.Memo(ctx=build_context(settings)), stop_flag=stop_flag, ready_flag=ready_flag,
    )


def main() -> None:
    settings = OperatorSettings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
