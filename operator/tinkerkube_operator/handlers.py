"""kopf handlers: thin wiring only (≤ 20 lines each); the work is in `reconciler`.

Registered on import into kopf's default registry. Each handler finds the shared `Context` in
`memo.ctx` (built by main.py's startup handler) and returns None, so kopf adds no status keys.
"""

from __future__ import annotations

from typing import Any

import kopf

from tinkerkube_contract.resource import GROUP, LABEL_SESSION, PLURAL, VERSION
from tinkerkube_operator import reconciler
from tinkerkube_operator.podview import PodView, observe

SESSIONS = {"group": GROUP, "version": VERSION, "plural": PLURAL}
TRAINER_PODS = {"labels": {LABEL_SESSION: kopf.PRESENT}}
RETRY_BACKOFF = 2.0  # seconds between retries of a handler that raised (kopf's default is 60)


@kopf.index("pods", **TRAINER_PODS)
def trainer_pods(namespace: str, labels: Any, body: Any, **_: Any) -> dict[tuple[str, str], PodView]:
    """Pods by (namespace, session), kept current by the watch: reconciles read it instead of listing."""
    return {(namespace, labels[LABEL_SESSION]): observe(body)}


def _pods(index: kopf.Index[tuple[str, str], PodView], namespace: str, name: str) -> list[PodView]:
    return list(index.get((namespace, name), ()))


@kopf.on.resume(**SESSIONS, backoff=RETRY_BACKOFF)
@kopf.on.create(**SESSIONS, backoff=RETRY_BACKOFF)
@kopf.on.update(**SESSIONS, field="spec", backoff=RETRY_BACKOFF)
async def session_changed(namespace: str, name: str, memo: kopf.Memo,
                          trainer_pods: kopf.Index[tuple[str, str], PodView], **_: Any) -> None:
    """Create/resume/update: ensure the children exist (idempotent by name, so restarts duplicate nothing)."""
    await reconciler.reconcile(memo.ctx, namespace, name, _pods(trainer_pods, namespace, name))


@kopf.daemon(**SESSIONS, cancellation_timeout=5.0, backoff=RETRY_BACKOFF)
async def session_clock(namespace: str, name: str, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                        trainer_pods: kopf.Index[tuple[str, str], PodView], **_: Any) -> None:
    """What time alone changes: recreation after a backoff, idle reaping, start timeouts."""
    ctx: reconciler.Context = memo.ctx
    while not await stopped.wait(ctx.settings.reconcile_interval_seconds):
        await reconciler.reconcile(ctx, namespace, name, _pods(trainer_pods, namespace, name))


@kopf.on.event("pods", **TRAINER_PODS)
async def trainer_pod_changed(namespace: str, labels: Any, memo: kopf.Memo,
                              trainer_pods: kopf.Index[tuple[str, str], PodView], **_: Any) -> None:
    """A pod moved (scheduled, ready, failed, deleted): re-derive its session's status."""
    session = labels.get(LABEL_SESSION)
    if session:
        await reconciler.reconcile(memo.ctx, namespace, session, _pods(trainer_pods, namespace, session))


@kopf.on.delete(**SESSIONS, backoff=RETRY_BACKOFF)
async def session_deleted(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Owned objects go with the session (explicitly, in case no garbage collector runs)."""
    await reconciler.delete_children(memo.ctx, namespace, name)
