"""Pool binding's I/O: a TrainingSession is bound to a TrainerPool (`pools.choose`), its status follows its
pool's (`pools.bound_status`), it is detached from its pool when it ends, and warm pools are kept topped up.

Only the operator's leader runs handlers (kopf peering), and one binding decision runs at a time
(`Context.bind_lock`): the decision and the write of `status.pool` that makes it count happen under it. The
warm-pool refill, which no resource event starts, checks the peering itself (`leader`).

Nothing waits for a clock tick: a binding or a detach re-counts the pool's runs at once, and every event of a
pool (`pool_moved`: Ready, a new endpoint, runs counted, deletion) re-derives the sessions bound to it and those
waiting for capacity in its namespace. The sessions' own tick stays as a safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import Any

import httpx
from pydantic import ValidationError

from tinkerkube_contract import pod_api
from tinkerkube_contract.conditions import ConditionType, Reason
from tinkerkube_contract.resource import (
    ANNOTATION_MODEL_ID,
    PLURAL,
    POOL_PLURAL,
    TrainerPoolStatus,
    TrainingSessionSpec,
    TrainingSessionStatus,
)
from tinkerkube_operator import conditions as cond
from tinkerkube_operator import leader, metrics, pools, reconciler, status
from tinkerkube_operator.podview import parse_time
from tinkerkube_operator.reconciler import POOL_PODS, SESSION_PODS, Context, _invalid, _write

log = logging.getLogger(__name__)
C = ConditionType


async def reconcile_session(ctx: Context, namespace: str, name: str) -> None:
    """Bind the session if it is not (or its pool is gone), then mirror its pool into its status."""
    metrics.RECONCILES.inc()
    try:
        async with ctx.locks[SESSION_PODS.key(namespace, name)]:
            await _reconcile_locked(ctx, namespace, name)
    except Exception:
        metrics.RECONCILE_ERRORS.inc()
        raise


async def _reconcile_locked(ctx: Context, namespace: str, name: str) -> None:
    body = await ctx.kube.get_object(PLURAL, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return
    old = status.parse_status(body.get("status"))
    if status.is_terminal(old):
        return
    try:
        spec = TrainingSessionSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        await _write(ctx, SESSION_PODS, body, old, _invalid(old, str(exc)))
        return
    now = ctx.clock()
    stamp = status.iso(now)
    if _idle(ctx, body, old, spec):
        await _end(ctx, body, old, spec, stamp)
        return
    pool_body = await ctx.kube.get_object(POOL_PLURAL, namespace, old.pool) if old.pool else None
    lost = None
    if old.pool and (pool_body is None or pool_body["metadata"].get("deletionTimestamp")):
        lost = (f"TrainerPool {old.pool} was deleted; the run is bound to another pool and the gateway replays "
                "its ops there")
        log.warning("session %s/%s: %s", namespace, name, lost)
        pool_body = None
    bound = None
    if pool_body is None:
        bound = await _bind(ctx, namespace, name, spec, body)
        if bound.pool is None:
            await _write(ctx, SESSION_PODS, body, old, pools.bound_status(old, None, None, now=stamp,
                                                                          waiting=bound.reason))
            return
        pool_body = await ctx.kube.get_object(POOL_PLURAL, namespace, bound.pool)
        old = old.model_copy(update={"pool": bound.pool})
        created = parse_time(body["metadata"].get("creationTimestamp"))
        if created is not None:
            metrics.BIND_WAIT.observe(max((now - created).total_seconds(), 0.0))
    pool_status = TrainerPoolStatus.model_validate((pool_body or {}).get("status") or {})
    new = pools.bound_status(old, old.pool, pool_status, now=stamp, lost=lost)
    await _write(ctx, SESSION_PODS, body, status.parse_status(body.get("status")), new)
    if bound is not None and bound.pool is not None:
        await recount(ctx, namespace, bound.pool)
        if bound.choice is pools.Choice.CLAIM:
            await refill_warm(ctx)  # handlers run on the leader only: replace the claimed pool now


def _idle(ctx: Context, body: dict[str, Any], old: TrainingSessionStatus, spec: TrainingSessionSpec) -> bool:
    obs = status.Observation(ref=SESSION_PODS.ref(body["metadata"]["namespace"], body["metadata"]["name"]),
                             spec=spec, old=old, pods=(), now=ctx.clock(),
                             created=parse_time(body["metadata"].get("creationTimestamp")))
    return status._idle(obs)


async def _end(ctx: Context, body: dict[str, Any], old: TrainingSessionStatus, spec: TrainingSessionSpec,
               stamp: str) -> None:
    message = f"no futures activity for {spec.idle_timeout_seconds}s"
    conds = cond.set_condition(old.conditions, cond.make(C.TERMINATED, True, Reason.IDLE_TIMEOUT, message), now=stamp)
    conds = cond.set_condition(conds, cond.make(C.READY, False, Reason.IDLE_TIMEOUT, message), now=stamp)
    new = old.model_copy(update={"conditions": conds, "endpoint": None, "phase": "Terminated"})
    await detach(ctx, body)
    await _write(ctx, SESSION_PODS, body, old, new)
    if old.pool:
        await recount(ctx, body["metadata"]["namespace"], old.pool)


async def _bind(ctx: Context, namespace: str, name: str, spec: TrainingSessionSpec,
                body: dict[str, Any]) -> pools.Binding:
    """Decide and record (status.pool) under the bind lock, so the next decision counts this run."""
    async with ctx.bind_lock:
        views = [pools.view(p) for p in await ctx.kube.list_objects(POOL_PLURAL, namespace)]
        used = Counter(_bound_pool(s) for s in await ctx.kube.list_objects(PLURAL, namespace)
                       if s["metadata"]["name"] != name)
        binding = pools.choose(spec, views, used, ctx.settings)
        if binding.choice is pools.Choice.WAIT:
            return pools.Binding(binding.choice, None, binding.reason)
        assert binding.pool is not None
        if binding.choice is pools.Choice.CLAIM:
            await ctx.kube.patch_pool(namespace, binding.pool, {"spec": {"owner": spec.owner}, "metadata": {
                "labels": pools.pool_body(binding.pool, namespace, pools.pool_spec(
                    None, ctx.settings, base_model=spec.base_model, owner=spec.owner))["metadata"]["labels"]}})
            log.info("session %s/%s claimed warm pool %s", namespace, name, binding.pool)
        elif binding.choice is pools.Choice.CREATE:
            new = pools.pool_spec(spec, ctx.settings, base_model=spec.base_model, owner=spec.owner)
            await ctx.kube.create_pool(pools.pool_body(binding.pool, namespace, new))
            log.info("session %s/%s: created pool %s", namespace, name, binding.pool)
        await ctx.kube.patch_object_status(PLURAL, namespace, name, {"pool": binding.pool})
        return binding


def _bound_pool(session: dict[str, Any]) -> str | None:
    raw = session.get("status") or {}
    if session["metadata"].get("deletionTimestamp") or status.is_terminal(TrainingSessionStatus.model_validate(raw)):
        return None
    return raw.get("pool")


async def detach(ctx: Context, body: dict[str, Any]) -> None:
    """`DELETE /v1/runs/{id}` on the session's pool (its pending ops fail there; its slot frees up). A pool
    that is gone or does not answer holds nothing of the run anyway."""
    raw = body.get("status") or {}
    url = (raw.get("endpoint") or {}).get("url")
    model_id = (body.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_MODEL_ID) or \
        (body.get("spec") or {}).get("modelId")
    if not raw.get("pool") or not url or not model_id:
        return
    headers = {pod_api.HEADER_TOKEN: ctx.settings.trainer_token} if ctx.settings.trainer_token else {}
    with contextlib.suppress(httpx.HTTPError):
        async with httpx.AsyncClient(timeout=10.0) as http:
            response = await http.delete(url + pod_api.run_path(model_id), headers=headers)
            log.info("detached %s from pool %s: %s", model_id, raw.get("pool"), response.status_code)


async def session_deleted(ctx: Context, namespace: str, name: str, body: dict[str, Any]) -> None:
    async with ctx.locks[SESSION_PODS.key(namespace, name)]:
        await detach(ctx, body)
    ctx.locks.pop(SESSION_PODS.key(namespace, name), None)
    ctx.phases.set(SESSION_PODS.key(namespace, name), None)
    pool = (body.get("status") or {}).get("pool")
    if pool:
        await recount(ctx, namespace, pool)  # the deleting session no longer counts: its slot frees up now


async def recount(ctx: Context, namespace: str, pool: str) -> None:
    """Reconcile the pool now (its runs used/free, idle clock), not on its next tick."""
    await reconciler.reconcile(ctx, namespace, pool, None, POOL_PODS)


async def pool_moved(ctx: Context, namespace: str, pool: str) -> None:
    """A pool changed (or went): re-derive the live sessions bound to it, and let the ones waiting for capacity
    in its namespace try again (a slot may have freed up). Read from the API, not an index: a session writes
    `status.pool` before it reads its pool, so a change it did not see finds it here."""
    todo = []
    for s in await ctx.kube.list_objects(PLURAL, namespace):
        if s["metadata"].get("deletionTimestamp"):
            continue
        raw = s.get("status") or {}
        if raw.get("pool") == pool or (not raw.get("pool") and waiting(s)):
            todo.append(s["metadata"]["name"])
    for name in todo:
        await reconcile_session(ctx, namespace, name)


def warm_namespace(ctx: Context) -> str:
    return ctx.settings.warm_pools_namespace or (ctx.settings.namespaces[0] if ctx.settings.namespaces else "default")


async def refill_warm(ctx: Context) -> list[str]:
    """Create the warm pools missing (deterministic names: replicas racing create one, the other gets 409)."""
    if not ctx.settings.pools or not ctx.settings.warm_pools:
        return []
    namespace = warm_namespace(ctx)
    async with ctx.bind_lock:
        views = [pools.view(p) for p in await ctx.kube.list_objects(POOL_PLURAL, namespace)]
        created = []
        for model, name in pools.warm_missing(views, ctx.settings.warm_pools):
            spec = pools.pool_spec(None, ctx.settings, base_model=model, owner="")
            if await ctx.kube.create_pool(pools.pool_body(name, namespace, spec)):
                created.append(name)
                log.info("created warm pool %s for %s", name, model)
        return created


async def warm_loop(ctx: Context, peering: leader.Peering) -> None:
    """Keeps warm pools topped up (started by main's startup handler when pools and warm pools are on). Every
    replica runs the loop; only the peering leader refills, the others stand by (each logs when that changes)."""
    leading: bool | None = None
    while True:
        try:
            now_leading = await leader.is_leader(ctx.kube, peering)
            if now_leading != leading:
                log.info("warm pools: %s (peering %r, priority %d)", "this replica leads the refill" if now_leading
                         else "standing by, another replica leads the refill", peering.name, peering.priority)
            leading = now_leading
            if leading:
                await refill_warm(ctx)
        except Exception:  # the API server may be briefly away: try again next tick
            log.warning("warm pool refill failed", exc_info=True)
        await asyncio.sleep(ctx.settings.reconcile_interval_seconds)


def waiting(body: dict[str, Any]) -> bool:
    """A session waiting for capacity (tests, metrics)."""
    found = cond.find(status.parse_status(body.get("status")).conditions, C.BOUND)
    return found is not None and found.status == cond.FALSE

