"""Composition root: settings → store, backend, dispatcher, services → create_app → uvicorn.

`python -m tinkerkube_gateway.main` (or `tinkerkube-gateway`) starts a local-mode gateway on
127.0.0.1:8000 by default and prints how to point the tinker SDK at it.
"""

from __future__ import annotations

import importlib
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

from tinkerkube_contract.models import BUILTIN_MODELS
from tinkerkube_contract.resource import Resources
from tinkerkube_gateway.app import create_app
from tinkerkube_gateway.backends.base import SessionBackend
from tinkerkube_gateway.backends.local import LocalBackend, LocalBackendConfig
from tinkerkube_gateway.clients.pod_client import PodClient
from tinkerkube_gateway.deps import Services
from tinkerkube_gateway.dispatcher import Dispatcher
from tinkerkube_gateway.metrics import Metrics
from tinkerkube_gateway.services.admission import AdmissionLimits, SampleAdmission
from tinkerkube_gateway.services.audit import AuditLog
from tinkerkube_gateway.services.cancel import CancelService
from tinkerkube_gateway.services.completions import CompletionsService
from tinkerkube_gateway.services.copies import CopyService
from tinkerkube_gateway.services.custom_losses import CustomLossService
from tinkerkube_gateway.services.downloads import DownloadsService
from tinkerkube_gateway.services.futures import FuturesService, QueueState, QueueStateSource, QueueStatus
from tinkerkube_gateway.services.image_assets import AssetSources, ImageAssets
from tinkerkube_gateway.services.keys import KeyRing
from tinkerkube_gateway.services.mirror import FuturesMirror
from tinkerkube_gateway.services.models import ModelsService
from tinkerkube_gateway.services.ops import OpsService
from tinkerkube_gateway.services.registry import RegistryService
from tinkerkube_gateway.services.replicas import Replicas
from tinkerkube_gateway.services.results import ResultsService
from tinkerkube_gateway.services.retention import Retention
from tinkerkube_gateway.services.sampling import SamplingService
from tinkerkube_gateway.services.session_search import SessionSearch
from tinkerkube_gateway.services.sessions import SessionsService
from tinkerkube_gateway.services.traces import TraceRecorder, TraceService
from tinkerkube_gateway.services.usage import UsageService
from tinkerkube_gateway.settings import BackendKind, GatewaySettings, inherited_environment
from tinkerkube_gateway.store.records import FutureRecord
from tinkerkube_gateway.store.repo import AsyncRepo, Repo

log = logging.getLogger("tinkerkube_gateway")


def make_backend(settings: GatewaySettings, pods: PodClient) -> SessionBackend:
    if settings.backend is BackendKind.KUBERNETES:
        module: Any = importlib.import_module("tinkerkube_gateway.backends.kubernetes")
        return module.KubernetesBackend.from_settings(settings, pods)  # type: ignore[no-any-return]
    config = LocalBackendConfig(
        checkpoint_dir=settings.effective_checkpoint_dir, logs_dir=settings.logs_dir,
        model_cache_dir=settings.model_cache_dir.resolve(), token=settings.kube_token or secrets.token_urlsafe(24),
        base_env=inherited_environment(), nproc_per_node=settings.trainer_nproc_per_node,
        device=settings.trainer_device, sharding=settings.trainer_sharding, sampler=settings.trainer_sampler,
        model_aliases=settings.model_aliases,
        command=settings.trainer_command,
        pool_max_runs=settings.pool_max_runs, pool_idle_seconds=settings.pool_idle_timeout_seconds,
        share_pools_across_tenants=settings.share_pools_across_tenants, pool_max_restarts=settings.pool_max_restarts,
        pool_restart_window_seconds=settings.pool_restart_window_seconds, pool_hang_seconds=settings.pool_hang_seconds,
        auto_checkpoint_steps=settings.trainer_auto_checkpoint_steps,
        start_timeout=settings.trainer_start_timeout_seconds)
    return LocalBackend(config, pods)


def spec_defaults(settings: GatewaySettings) -> dict[str, Any]:
    """TrainingSessionSpec placement fields from settings (the Kubernetes backend renders them)."""
    return {"replicas": settings.trainer_replicas, "procs_per_pod": settings.trainer_nproc_per_node,
            "resources": Resources(gpus=settings.trainer_gpus, cpu=settings.trainer_cpu,
                                   memory=settings.trainer_memory),
            "image": settings.trainer_image, "node_selector": settings.trainer_node_selector,
            "tolerations": settings.trainer_tolerations, "priority_class_name": settings.trainer_priority_class_name,
            "idle_timeout_seconds": settings.kube_idle_timeout_seconds}


def make_futures(settings: GatewaySettings, repo: AsyncRepo, metrics: Metrics,
                 backend: SessionBackend) -> FuturesService:
    """Futures, mirrored where operators see them, saying `paused_capacity` while their run waits for room."""
    futures = FuturesService(repo, metrics, long_poll_seconds=settings.long_poll_seconds)
    futures.mirror = FuturesMirror(backend, repo)
    futures.queue_sources.append(capacity_source(backend))
    return futures


def capacity_source(backend: SessionBackend) -> QueueStateSource:
    """Futures of a run whose trainer waits for cluster capacity say `paused_capacity` (and why), not a failure.
    Backends that never wait (local) have no `capacity_wait`."""
    wait = getattr(backend, "capacity_wait", None)

    def source(record: FutureRecord) -> QueueStatus | None:
        reason = wait(record.target_id) if wait is not None and record.target_id else None
        return QueueStatus(QueueState.PAUSED_CAPACITY, reason) if reason else None
    return source


async def make_keys(settings: GatewaySettings, repo: AsyncRepo, metrics: Metrics,
                    sessions: SessionsService) -> KeyRing:
    """The configured keys, less those revoked in the store (reloaded by the sessions' periodic loop)."""
    keys = KeyRing(settings.tenant_keys(), repo, metrics, token_ttl_seconds=settings.auth_token_ttl_seconds)
    await keys.refresh()
    sessions.periodic.append(keys.refresh)
    return keys


def make_admission(settings: GatewaySettings, metrics: Metrics, futures: FuturesService,
                   dispatcher: Dispatcher) -> SampleAdmission:
    """Sampling backpressure; its waiting samples answer try_again with a paused queue_state."""
    limits = AdmissionLimits(pool_inflight=settings.pool_max_inflight_samples, pool_queue=settings.pool_sample_queue,
                             tenant_inflight=settings.tenant_max_concurrent_samples,
                             tenant_queue=settings.tenant_sample_queue,
                             tenant_tokens_per_minute=settings.tenant_sampled_tokens_per_minute)
    admission = SampleAdmission(limits, metrics, dispatcher.spawn)
    futures.queue_sources.append(admission.status)
    return admission


def make_sampling(settings: GatewaySettings, metrics: Metrics, futures: FuturesService, sessions: SessionsService,
                  models: ModelsService, registry: RegistryService, dispatcher: Dispatcher) -> SamplingService:
    return SamplingService(futures=futures, sessions=sessions, models=models, registry=registry,
                           dispatcher=dispatcher, max_sample_tokens=settings.max_sample_tokens,
                           admission=make_admission(settings, metrics, futures, dispatcher),
                           assets=make_image_assets(settings, metrics))


def make_image_assets(settings: GatewaySettings, metrics: Metrics) -> ImageAssets | None:
    """The resolver of image asset pointers, None (pointers refused) unless a source is configured."""
    sources = AssetSources(hosts=tuple(settings.image_asset_hosts), root=settings.image_asset_root,
                           timeout_seconds=settings.image_asset_timeout_seconds,
                           max_request_bytes=settings.max_body_bytes)
    return ImageAssets(sources, metrics) if sources.enabled else None


def client_config(settings: GatewaySettings) -> dict[str, object]:
    """What the client config adds to `routers.service.CLIENT_CONFIG`."""
    return {"fwdbwd_max_chunk_len": settings.fwdbwd_max_chunk_len,
            "proto_compress_fwdbwd": settings.proto_compress_fwdbwd,
            "sample_use_retrieve_futures": settings.sample_use_retrieve_futures,
            "pjwt_auth_enabled": settings.auth_jwt_enabled}


def capabilities(settings: GatewaySettings) -> list[str]:
    if settings.models:
        return list(settings.models)
    names = [settings.default_base_model, *BUILTIN_MODELS, *settings.model_aliases]
    return list(dict.fromkeys(names))


def wire_replicas(replicas: Replicas, futures: FuturesService, dispatcher: Dispatcher, models: ModelsService,
                  sampling: SamplingService) -> None:
    """Cross-replica events into this replica's notifier and dispatcher (no-ops on SQLite)."""
    futures.broadcast = replicas.completed_payload
    replicas.on_completed = futures.completed_elsewhere
    replicas.on_submitted = dispatcher.refill
    replicas.on_lost = dispatcher.drop

    async def take_over(model_id: str) -> None:  # in a task: the heartbeat never waits on a trainer
        dispatcher.spawn(models.adopt(model_id, wait=False))

    replicas.on_orphan = take_over

    async def rerun_sample(request_id: str) -> None:
        dispatcher.spawn(sampling.resume(request_id))

    replicas.on_orphan_sample = rerun_sample

    def resync() -> None:
        futures.resync()
        dispatcher.refill_all()

    replicas.on_resync = resync


@asynccontextmanager
async def compose(settings: GatewaySettings, backend: SessionBackend | None = None) -> AsyncIterator[Services]:
    """`backend`: where trainers run; default from settings (tests pass one shared by replicas)."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    metrics = Metrics()
    repo = AsyncRepo(Repo(settings.effective_database_url))
    recorder = TraceRecorder()
    pods = PodClient(timeout=settings.trainer_request_timeout_seconds, observer=recorder)
    backend = backend or make_backend(settings, pods)
    futures = make_futures(settings, repo, metrics, backend)
    replicas = Replicas(repo, multi=settings.multi_replica, lease_seconds=settings.lease_seconds,
                        database_url=settings.effective_database_url)
    registry = RegistryService(repo, settings.effective_checkpoint_dir)
    results = ResultsService(repo=repo, futures=futures, registry=registry, replicas=replicas, backend=backend,
                             mirror_checkpoint=getattr(backend, "mirror_checkpoint", None))  # an optional hook
    dispatcher = Dispatcher(repo=repo, backend=backend, pods=pods, sink=results,
                            start_timeout=settings.trainer_start_timeout_seconds,
                            gap_timeout=settings.seq_gap_timeout_seconds, max_ahead=settings.max_seq_ahead,
                            replica_id=replicas.replica_id, on_sample_done=replicas.untrack_sample)
    sessions = SessionsService(repo, metrics, idle_timeout=settings.session_idle_timeout_seconds,
                               reap_interval=settings.reaper_interval_seconds)
    models = ModelsService(repo=repo, futures=futures, sessions=sessions, dispatcher=dispatcher, backend=backend,
                           model_cache_dir=settings.model_cache_dir.resolve(), model_aliases=settings.model_aliases,
                           idle_timeout=settings.session_idle_timeout_seconds, spec_defaults=spec_defaults(settings),
                           replicas=replicas)
    ops = OpsService(futures=futures, models=models, registry=registry, dispatcher=dispatcher)
    sampling = make_sampling(settings, metrics, futures, sessions, models, registry, dispatcher)
    completions = CompletionsService(futures, sampling)
    sessions.stop_runs = models.stop_session_runs
    sessions.on_heartbeat = models.keep_session_alive
    retention = Retention(repo, metrics, audit_days=settings.audit_retention_days,
                          usage_days=settings.usage_retention_days)
    sessions.periodic += [registry.sweep_expired, completions.sweep, retention.prune]
    wire_replicas(replicas, futures, dispatcher, models, sampling)
    metrics.queue_depth.set(await repo.count_pending())
    await sessions.refresh_gauge()
    replicas.start()
    await models.recover()
    sessions.start()
    try:
        yield Services(sessions=sessions, futures=futures, models=models, ops=ops, sampling=sampling,
                       registry=registry, metrics=metrics, keys=await make_keys(settings, repo, metrics, sessions),
                       max_body_bytes=settings.max_body_bytes, capabilities=capabilities(settings),
                       client_config=client_config(settings), audit=AuditLog(repo), usage=UsageService(repo),
                       dynamic_config={"sample_cancel_enabled": settings.sample_cancel_enabled},
                       completions=completions, cancels=CancelService(futures, dispatcher, sampling),
                       downloads=DownloadsService(repo, registry, url_ttl_seconds=settings.download_url_ttl_seconds,
                                                  public_url=settings.public_url),
                       copies=CopyService(repo, registry, sessions), session_search=SessionSearch(repo),
                       traces=TraceService(repo, recorder), custom_losses=CustomLossService(
                           repo=repo, futures=futures, sessions=sessions, models=models, metrics=metrics))
    finally:
        if sampling.admission is not None:
            sampling.admission.close()
        await sessions.close()
        await replicas.close()
        await dispatcher.close()
        await futures.mirror.close()
        await backend.close()
        await pods.close()
        repo.close()


def build_app(settings: GatewaySettings) -> FastAPI:
    return create_app(lambda: compose(settings))


def banner(settings: GatewaySettings) -> str:
    url = f"http://{settings.host}:{settings.port}"
    keys = settings.tenant_keys()
    key = next(iter(keys)) if len(keys) == 1 else "tml-<your key>"
    return (f"tinkerkube gateway ({settings.backend.value} backend) on {url}; docs at {url}/docs\n"
            f"connect the tinker SDK / cookbook with:\n"
            f"  export TINKER_BASE_URL={url} TINKER_API_KEY={key}\n"
            f"default base model: {settings.default_base_model}; state in {settings.state_dir.resolve()}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = GatewaySettings()
    print(banner(settings), flush=True)
    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, log_level="info",
                access_log=settings.access_log)


if __name__ == "__main__":
    main()
