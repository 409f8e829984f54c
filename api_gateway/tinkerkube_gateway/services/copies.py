"""copy_weights: a checkpoint copied into a new training run that only holds it (it cannot be trained).

The SDK's semantics: the copy keeps the source's kind and name and belongs to a new run, either the
slot `session_id` + `model_seq_id` of a session of the caller, or (`destination_project_id`) the first
run of a new session in that project, which is created finished: it exists to own the copy. Storage is
shared with the source: the files are hard links in the checkpoint store where the file system allows
(a copy where it does not), so deleting the source leaves the copy whole. The new session's id is
derived from the request's idempotency key, so the SDK's retries of one call make one copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from tinkerkube_contract import paths
from tinkerkube_contract.resource import SessionMode
from tinkerkube_gateway.errors import InvalidRequest, NotFound
from tinkerkube_gateway.schemas import CopyWeightsRequest
from tinkerkube_gateway.services.registry import RegistryService
from tinkerkube_gateway.services.sessions import SessionsService
from tinkerkube_gateway.store.records import CheckpointRecord, ModelStatus, SessionStatus
from tinkerkube_gateway.store.repo import AsyncRepo

HOLDS_A_COPY = "holds a copy of {source}: copies cannot be trained (create a training client from it instead)"


class CopyService:
    def __init__(self, repo: AsyncRepo, registry: RegistryService, sessions: SessionsService):
        self.repo = repo
        self.registry = registry
        self.sessions = sessions

    async def copy(self, tenant: str, req: CopyWeightsRequest, *, granted_by: str | None,
                   idempotency_key: str | None) -> str:
        source = await self.registry.resolve_loadable(tenant, req.source_path, granted_by)
        run = await self.repo.get_model(source.run_id)
        if run is None:
            raise NotFound(f"the training run of {req.source_path} is unknown")
        session_id, seq = await self._destination(tenant, req, idempotency_key)
        parsed = paths.parse_tinker_path(source.tinker_path)
        copy_path = paths.TinkerPath(paths.model_id_for(session_id, seq), parsed.kind, parsed.name)
        now = time.time()
        created = await self.repo.insert_model(
            model_id=copy_path.run_id, session_id=session_id, tenant=tenant, kind=SessionMode.TRAIN.value,
            base_model=run.base_model, lora=run.lora, user_metadata=None, optimizer_config=run.optimizer_config,
            restore_from=source.tinker_path, weights_key=None, status=ModelStatus.STOPPED,
            error=HOLDS_A_COPY.format(source=source.tinker_path), created_at=now, last_request_time=now)
        if not created:
            existing = await self.repo.get_model(copy_path.run_id)
            if existing is None or existing.tenant != tenant or existing.restore_from != source.tinker_path \
                    or await self.repo.get_checkpoint(str(copy_path)) is None:
                raise InvalidRequest(f"run {copy_path.run_id} already exists; copy into a model_seq_id of your "
                                     "session that is not used yet")
            return str(copy_path)  # a retry of this very copy
        await asyncio.to_thread(_link_tree, parsed.directory(self.registry.checkpoint_dir),
                                copy_path.directory(self.registry.checkpoint_dir))
        await self.repo.upsert_checkpoint(CheckpointRecord(
            tinker_path=str(copy_path), run_id=copy_path.run_id, tenant=tenant, kind=parsed.kind, name=parsed.name,
            size_bytes=source.size_bytes, public=False, created_at=now,
            expires_at=now + req.ttl_seconds if req.ttl_seconds else None, user_metadata=source.user_metadata))
        return str(copy_path)

    async def _destination(self, tenant: str, req: CopyWeightsRequest, key: str | None) -> tuple[str, int]:
        """(session, model_seq_id) of the run that will own the copy."""
        if req.session_id is not None:
            if req.model_seq_id is None:
                raise InvalidRequest("copy_weights with session_id needs model_seq_id")
            await self.sessions.get_active(tenant, req.session_id)
            return req.session_id, req.model_seq_id
        if req.destination_project_id is None:
            raise InvalidRequest("copy_weights needs destination_project_id, or session_id and model_seq_id")
        digest = hashlib.sha256(f"{tenant}\n{key}".encode()).hexdigest() if key else uuid.uuid4().hex
        session_id = "sess-" + digest[:16]
        existing = await self.repo.get_session(session_id)
        if existing is None:
            now = time.time()
            await self.repo.insert_session(
                session_id=session_id, tenant=tenant, status=SessionStatus.FINISHED, created_at=now,
                last_heartbeat=now, user_metadata=None, tags=["copy_weights"],
                display_name=f"copy of {req.source_path}", ended_reason="created by copy_weights to own a copy")
            await self.repo.set_session_extras(session_id, project_id=req.destination_project_id)
        elif existing.tenant != tenant:
            raise InvalidRequest("this X-Idempotency-Key was used by another caller; send a new one")
        return session_id, 0


def _link_tree(source: Path, target: Path) -> None:
    """`target` becomes a copy of `source` sharing its bytes (hard links; copies across file systems),
    made beside it and renamed into place like every checkpoint."""
    if not source.is_dir():
        raise NotFound(f"the files of {source.name} are gone from the checkpoint store")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for path in source.rglob("*"):
            dest = tmp / path.relative_to(source)
            if path.is_dir() and not path.is_symlink():
                dest.mkdir(parents=True, exist_ok=True)
            elif path.is_file() and not path.is_symlink():
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path, dest)
                except OSError:
                    shutil.copy2(path, dest)
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
