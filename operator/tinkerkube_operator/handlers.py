"""kopf handlers: thin wiring only (≤ 20 lines each); the work is in `reconciler` and `binding`.

Registered on import into kopf's default registry. Each handler finds the shared `Context` in
`memo.ctx` (built by main.py's startup handler) and returns None, so kopf adds no status keys.
TrainingSessions either own a pod set (`reconciler`, SESSION_PODS) or, with `pools` on (the default), are
bound to a TrainerPool (`binding`); TrainerPools always own a pod set (`reconciler`, POOL_PODS).
"""

from __future__ import annotations

from typing import Any

import kopf

from tinkerkube_contract.resource import GROUP, LABEL_POOL, LABEL_SESSION, PLURAL, POOL_PLURAL, VERSION
from tinkerkube_operator import binding, reconciler
from tinkerkube_operator.podview import PodView, observe
from tinkerkube_operator.reconciler import POOL_PODS

SESSIONS = {"group": GROUP, "version": VERSION, "plural": PLURAL}
POOLS = {"group": GROUP, "version": VERSION, "plural": POOL_PLURAL}
TRAINER_PODS = {"labels": {LABEL_SESSION: kopf.PRESENT}}
POOL_PODS_FILTER = {"labels": {LABEL_POOL: kopf.PRESENT}}
RETRY_BACKOFF = 2.0  # seconds between retries of a handler that raised (kopf's default is 60)


@kopf.index("pods", **TRAINER_PODS)
def trainer_pods(namespace: str, labels: Any, body: Any, **_: Any) -> dict[tuple[str, str], PodView]:
    """Pods by (namespace, session), kept current by the watch: reconciles read it instead of listing."""
    return {(namespace, labels[LABEL_SESSION]): observe(body)}


@kopf.index("pods", **POOL_PODS_FILTER)
def pool_pods(namespace: str, labels: Any, body: Any, **_: Any) -> dict[tuple[str, str], PodView]:
    """Pods by (namespace, pool)."""
    return {(namespace, labels[LABEL_POOL]): observe(body)}


def _pods(index: kopf.Index[tuple[str, str], PodView], namespace: str, name: str) -> list[PodView]:
    return list(index.get((namespace, name), ()))


async def _session(ctx: reconciler.Context, namespace: str, name: str,
                   index: kopf.Index[tuple[str, str], PodView]) -> None:
    if ctx.settings.pools:
        await binding.reconcile_session(ctx, namespace, name)
    else:
        await reconciler.reconcile(ctx, namespace, name, _pods(index, namespace, name))


@kopf.on.resume(**SESSIONS, backoff=RETRY_BACKOFF)
@kopf.on.create(**SESSIONS, backoff=RETRY_BACKOFF)
@kopf.on.update(**SESSIONS, field="spec", backoff=RETRY_BACKOFF)
async def session_changed(namespace: str, name: str, memo: kopf.Memo,
                          trainer_pods: kopf.Index[tuple[str, str], PodView], **_: Any) -> None:
    """Create/resume/update: ensure the children exist, or the binding (idempotent: restarts duplicate nothing)."""
    await _session(memo.ctx, namespace, name, trainer_pods)


@kopf.daemon(**SESSIONS, cancellation_timeout=5.0, backoff=RETRY_BACKOFF)
async def session_clock(namespace: str, name: str, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                        trainer_pods: kopf.Index[tuple[str, str], PodView], **_: Any) -> None:
    """What time alone changes: recreation after a backoff, idle reaping, start timeouts, a pool's progress."""
    ctx: reconciler.Context = memo.ctx
    while not await stopped.wait(ctx.settings.reconcile_interval_seconds):
        await _session(ctx, namespace, name, trainer_pods)


@kopf.on.event("pods", **TRAINER_PODS)
async def trainer_pod_changed(namespace: str, labels: Any, memo: kopf.Memo,
                              trainer_pods: kopf.Index[tuple[str, str], PodView], **_: Any) -> None:
    """A pod moved (scheduled, ready, failed, deleted): re-derive its session's status."""
    session = labels.get(LABEL_SESSION)
    if session:
        await reconciler.reconcile(memo.ctx, namespace, session, _pods(trainer_pods, namespace, session))


@kopf.on.delete(**SESSIONS, backoff=RETRY_BACKOFF)
async def session_deleted(namespace: str, name: str, body: Any, memo: kopf.Memo, **_: Any) -> None:
    """Owned objects go with the session (explicitly, in case no garbage collector runs); a bound run is
    detached from its pool."""
    if memo.ctx.settings.pools:
        await binding.session_deleted(memo.ctx, namespace, name, dict(body))
    await reconciler.delete_children(memo.ctx, namespace, name)


@kopf.on.resume(**POOLS, backoff=RETRY_BACKOFF)
@kopf.on.create(**POOLS, backoff=RETRY_BACKOFF)
@kopf.on.update(**POOLS, field="spec", backoff=RETRY_BACKOFF)
async def pool_changed(namespace: str, name: str, memo: kopf.Memo,
                       pool_pods: kopf.Index[tuple[str, str], PodView], **_: Any) -> None:
    await reconciler.reconcile(memo.ctx, namespace, name, _pods(pool_pods, namespace, name), POOL_PODS)


@kopf.daemon(**POOLS, cancellation_timeout=5.0, backoff=RETRY_BACKOFF)
async def pool_clock(namespace: str, name: str, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                     pool_pods: kopf.Index[tuple[str, str], PodView], **_: Any) -> None:
    """Recreation after a backoff, runs used/free, idle deletion."""
    ctx: reconciler.Context = memo.ctx
    while not await stopped.wait(ctx.settings.reconcile_interval_seconds):
        await reconciler.reconcile(ctx, namespace, name, _pods(pool_pods, namespace, name), POOL_PODS)


@kopf.on.event("pods", **POOL_PODS_FILTER)
async def pool_pod_changed(namespace: str, labels: Any, memo: kopf.Memo,
                           pool_pods: kopf.Index[tuple[str, str], PodView], **_: Any) -> None:
    pool = labels.get(LABEL_POOL)
    if pool:
        await reconciler.reconcile(memo.ctx, namespace, pool, _pods(pool_pods, namespace, pool), POOL_PODS)


@kopf.on.event(**POOLS)
async def pool_event(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Any change of a pool (Ready, a new endpoint, runs counted, deletion): its sessions follow now, and runs
    waiting for capacity try again, instead of on their next tick."""
    if memo.ctx.settings.pools:
        await binding.pool_moved(memo.ctx, namespace, name)


@kopf.on.delete(**POOLS, backoff=RETRY_BACKOFF)
async def pool_deleted(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Its pods go; the sessions bound to it are bound again (`pool_event` saw the deletion)."""
    await reconciler.delete_children(memo.ctx, namespace, name, POOL_PODS)
