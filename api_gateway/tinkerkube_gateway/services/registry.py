"""The checkpoint registry and the REST views over runs, checkpoints and sessions.

Every path and name is parsed through `tinkerkube_contract.paths` (no `..`, `/` or NUL can reach the
file system). A tenant sees only its own runs and checkpoints; another tenant's are "unknown" (404),
except published checkpoints, which anyone may read (load, sample, weights_info).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tinkerkube_contract import paths, pod_api
from tinkerkube_contract.resource import SessionMode
from tinkerkube_gateway.errors import InvalidRequest, UnknownCheckpoint, UnknownModel
from tinkerkube_gateway.store.records import CheckpointRecord, FutureRecord, ModelRecord, ModelStatus
from tinkerkube_gateway.store.repo import AsyncRepo

log = logging.getLogger(__name__)

_TYPE = {paths.CheckpointKind.WEIGHTS: "training", paths.CheckpointKind.SAMPLER_WEIGHTS: "sampler",
         paths.CheckpointKind.EXTERNAL_WEIGHTS: "external"}
_LAST_DATE = datetime(9999, 12, 31, tzinfo=UTC).timestamp()


def iso(ts: float) -> str:
    """An ISO date; a time past year 9999 (never accepted now, but maybe stored before bounds) is shown
    as that year rather than failing every listing that includes it."""
    return datetime.fromtimestamp(min(ts, _LAST_DATE), UTC).isoformat()


def _str_map(data: dict[str, Any] | None) -> dict[str, str] | None:
    return None if data is None else {str(k): str(v) for k, v in data.items()}


class RegistryService:
    def __init__(self, repo: AsyncRepo, checkpoint_dir: Path):
        self.repo = repo
        self.checkpoint_dir = checkpoint_dir

    async def add_sampler(self, model: ModelRecord, sampler_id: str, *, snapshot_id: str | None,
                          model_path: str | None = None, backing_model_id: str | None = None) -> None:
        await self.repo.insert_sampler(
            sampler_id=sampler_id, session_id=model.session_id, tenant=model.tenant, base_model=model.base_model,
            model_path=model_path, backing_model_id=backing_model_id or model.model_id, snapshot_id=snapshot_id,
            created_at=time.time())

    async def check_free(self, model: ModelRecord, kind: paths.CheckpointKind, name: str, *, overwrite: bool) -> None:
        path = str(paths.TinkerPath(model.model_id, kind, name))
        if not overwrite and await self.repo.get_checkpoint(path) is not None:
            raise InvalidRequest(f"checkpoint {path} already exists; pass overwrite=True or use a new name")

    async def register(self, fut: FutureRecord, written: pod_api.CheckpointWritten, meta: dict[str, Any]) -> None:
        parsed = paths.parse_tinker_path(written.tinker_path)
        now = time.time()
        ttl = meta.get("ttl_seconds")
        await self.repo.upsert_checkpoint(CheckpointRecord(
            tinker_path=str(parsed), run_id=parsed.run_id, tenant=fut.tenant, kind=parsed.kind.value,
            name=parsed.name, size_bytes=written.size_bytes, public=False, created_at=now,
            expires_at=now + ttl if ttl else None, user_metadata=_str_map(meta.get("user_metadata"))))

    async def resolve_readable(self, tenant: str, tinker_path: str, granted_by: str | None = None) -> CheckpointRecord:
        """The checkpoint when `tenant` may read it: its own, a published one, or one of `granted_by` (the
        tenant whose API key came as a weights access token)."""
        parsed = paths.parse_tinker_path(tinker_path)
        record = await self.repo.get_checkpoint(str(parsed))
        if record is None or (record.tenant not in (tenant, granted_by) and not record.public):
            raise UnknownCheckpoint(f"unknown checkpoint {tinker_path}")
        return record

    async def resolve_loadable(self, tenant: str, tinker_path: str, granted_by: str | None = None) -> CheckpointRecord:
        """`resolve_readable`, for loading into a trainer: external weights are files for download only."""
        record = await self.resolve_readable(tenant, tinker_path, granted_by)
        if record.kind == paths.CheckpointKind.EXTERNAL_WEIGHTS:
            raise InvalidRequest(f"{tinker_path} holds external weights, which are for download only; load a "
                                 "weights or sampler_weights checkpoint")
        return record

    async def resolve_owned(self, tenant: str, run_id: str, checkpoint_id: str) -> CheckpointRecord:
        parsed = paths.parse_checkpoint_id(run_id, checkpoint_id)
        record = await self.repo.get_checkpoint(str(parsed))
        if record is None or record.tenant != tenant:
            raise UnknownCheckpoint(f"unknown checkpoint {parsed}")
        return record

    async def delete(self, tenant: str, run_id: str, checkpoint_id: str) -> None:
        record = await self.resolve_owned(tenant, run_id, checkpoint_id)
        await self._delete(record)

    async def _delete(self, record: CheckpointRecord) -> None:
        await self.repo.delete_checkpoint(record.tinker_path)
        directory = paths.parse_tinker_path(record.tinker_path).directory(self.checkpoint_dir)
        if directory.resolve().is_relative_to(self.checkpoint_dir.resolve()):
            await asyncio.to_thread(shutil.rmtree, directory, True)

    async def set_ttl(self, tenant: str, run_id: str, checkpoint_id: str, ttl: int | None) -> None:
        record = await self.resolve_owned(tenant, run_id, checkpoint_id)
        await self.repo.update_checkpoint(record.tinker_path, expires_at=time.time() + ttl if ttl else None)

    async def set_public(self, tenant: str, run_id: str, checkpoint_id: str, public: bool) -> None:
        record = await self.resolve_owned(tenant, run_id, checkpoint_id)
        await self.repo.update_checkpoint(record.tinker_path, public=public)

    async def sweep_expired(self) -> None:
        for record in await self.repo.expired_checkpoints(time.time()):
            log.info("checkpoint %s expired (ttl)", record.tinker_path)
            await self._delete(record)

    # --- JSON views (tinker.types shapes) ------------------------------------------------------------
    @staticmethod
    def checkpoint_json(record: CheckpointRecord) -> dict[str, Any]:
        return {"checkpoint_id": f"{record.kind}/{record.name}", "checkpoint_type": _TYPE[record.kind],
                "time": iso(record.created_at), "tinker_path": record.tinker_path, "size_bytes": record.size_bytes,
                "public": record.public, "user_metadata": record.user_metadata,
                "expires_at": iso(record.expires_at) if record.expires_at else None}

    async def run_json(self, record: ModelRecord) -> dict[str, Any]:
        checkpoints = await self.repo.list_checkpoints(tenant=record.tenant, run_id=record.model_id, limit=1000)
        last = {kind: next((c for c in checkpoints if c.kind == kind), None)
                for kind in (paths.CheckpointKind.WEIGHTS, paths.CheckpointKind.SAMPLER_WEIGHTS)}
        return {"training_run_id": record.model_id, "base_model": record.base_model, "model_owner": record.tenant,
                "is_lora": True, "corrupted": record.status == ModelStatus.FAILED,
                "lora_rank": (record.lora or {}).get("rank"), "last_request_time": iso(record.last_request_time),
                "last_checkpoint": self._json_or_none(last[paths.CheckpointKind.WEIGHTS]),
                "last_sampler_checkpoint": self._json_or_none(last[paths.CheckpointKind.SAMPLER_WEIGHTS]),
                "user_metadata": _str_map(record.user_metadata)}

    def _json_or_none(self, record: CheckpointRecord | None) -> dict[str, Any] | None:
        return None if record is None else self.checkpoint_json(record)

    async def get_run(self, tenant: str, run_id: str) -> ModelRecord:
        paths.validate_run_id(run_id)
        record = await self.repo.get_model(run_id)
        if record is None or record.tenant != tenant or record.kind != SessionMode.TRAIN:
            raise UnknownModel(f"unknown training run {run_id!r}")
        return record

    async def list_runs(self, tenant: str, limit: int, offset: int) -> dict[str, Any]:
        runs = await self.repo.list_models(tenant=tenant, kind=SessionMode.TRAIN, limit=limit, offset=offset)
        total = await self.repo.count_models(tenant, SessionMode.TRAIN)
        return {"training_runs": [await self.run_json(r) for r in runs],
                "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    async def list_checkpoints(self, tenant: str, run_id: str | None, limit: int, offset: int) -> dict[str, Any]:
        if run_id is not None:
            await self.get_run(tenant, run_id)
        records = await self.repo.list_checkpoints(tenant=tenant, run_id=run_id, limit=limit, offset=offset)
        total = await self.repo.count_checkpoints(tenant, run_id)
        return {"checkpoints": [self.checkpoint_json(r) for r in records],
                "cursor": {"offset": offset, "limit": limit, "total_count": total}}

    async def weights_info(self, tenant: str, tinker_path: str) -> dict[str, Any]:
        checkpoint = await self.resolve_readable(tenant, tinker_path)
        run = await self.repo.get_model(checkpoint.run_id)
        if run is None:
            raise UnknownCheckpoint(f"the training run of {tinker_path} is unknown")
        lora = run.lora or {}
        return {"base_model": run.base_model, "is_lora": True, "lora_rank": lora.get("rank"),
                "train_unembed": lora.get("train_unembed"), "train_mlp": lora.get("train_mlp"),
                "train_attn": lora.get("train_attn")}
