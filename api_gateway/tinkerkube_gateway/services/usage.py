"""Usage the gateway knows, as the admin client's billing shapes (`GET /api/v1/billing/usage/events`,
`GET /api/v1/billing/usage/checkpoints/current`).

What is counted, when an op finishes well (recorded in the commit that finishes its future, so once):
forward_backward → `training` tokens (every datum's model input); a sample → `sampling_prefill` (its
prompt's tokens, `cached` always false: no prefix cache is billed apart) and `sampling_sample` (the tokens
it generated, every sequence); a saved checkpoint (save_weights, save_weights_for_sampler,
save_weights_external) → one `checkpoint`. `storage` is the GB-hours of the tenant's checkpoints that exist
now, over the part of each hour bucket they existed in (a deleted checkpoint's past storage is not kept).
No prices: this gateway bills nothing, so every cost and rate is null.
"""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import DecodeError
from tinker.proto import tinker_public_pb2 as pb

from tinkerkube_contract import pod_api
from tinkerkube_gateway.errors import InvalidRequest
from tinkerkube_gateway.store.ledger import HOUR, Usage, UsageRow
from tinkerkube_gateway.store.records import CheckpointRecord, FutureOp, FutureRecord
from tinkerkube_gateway.store.repo import AsyncRepo

MAX_WINDOW_HOURS = 14 * 24  # the SDK's documented bound: ending_before at most 14 days after starting_on
GIGABYTE = 1_000_000_000
CHECKPOINT_OPS = frozenset({FutureOp.SAVE_STATE, FutureOp.SAVE_SAMPLER_WEIGHTS, FutureOp.SAVE_WEIGHTS_EXTERNAL})


def sampled_tokens(result: bytes | None, result_type: str | None) -> int | None:
    """Tokens a finished sample generated (every sequence's), None when there is no sample response."""
    if result is None or not (result_type or "").startswith(pod_api.CONTENT_PROTOBUF):
        return None
    try:
        response = pb.SampleResponse.FromString(result)
    except DecodeError:
        return None
    return sum(len(sequence.tokens) // 4 for sequence in response.sequences)


def training_tokens(body: bytes | None) -> int:
    """Tokens of a forward_backward request's model inputs (text tokens, and images' expected tokens)."""
    if not body:
        return 0
    try:
        msg = pb.ForwardBackwardRequest.FromString(body)
    except DecodeError:
        return 0
    n = 0
    for datum in msg.data:
        for chunk in datum.model_input:
            which = chunk.WhichOneof("chunk")
            if which == "encoded_text":
                n += len(chunk.encoded_text.tokens) // 4
            elif which == "image":
                n += int(chunk.image.expected_tokens)
    return n


def prompt_tokens(body: bytes | None) -> int:
    """Tokens of a sample request's prompt (its JSON body, as checked at submit)."""
    import json

    try:
        return prompt_length(json.loads(body or b"{}").get("prompt", {}))
    except (ValueError, AttributeError):
        return 0


def prompt_length(prompt: Any) -> int:
    """Tokens of a sample request's prompt JSON: text tokens, and image chunks' expected_tokens where given
    (so a lower bound for images without it; the trainer counts them exactly)."""
    chunks = prompt.get("chunks", []) if isinstance(prompt, dict) else []
    n = 0
    for chunk in chunks if isinstance(chunks, list) else []:
        if not isinstance(chunk, dict):
            continue
        tokens, expected = chunk.get("tokens"), chunk.get("expected_tokens")
        n += len(tokens) if isinstance(tokens, list) else expected if isinstance(expected, int) else 0
    return n


def usage_of(record: FutureRecord, result: bytes | None, result_type: str | None) -> Usage | None:
    """What a future that completed well used; None for ops that use nothing billed."""
    items: tuple[tuple[str, int], ...]
    if record.op == FutureOp.FORWARD_BACKWARD:
        counted = (record.meta or {}).get("tokens")  # counted at submit (wire.check_forward_backward)
        items = (("training", counted if isinstance(counted, int) else training_tokens(record.body)),)
    elif record.op == FutureOp.SAMPLE:
        items = (("sampling_prefill", prompt_tokens(record.body)),
                 ("sampling_sample", sampled_tokens(result, result_type) or 0))
    elif record.op in CHECKPOINT_OPS:
        items = (("checkpoint", 1),)
    else:
        return None
    return Usage(record.tenant, record.session_id, record.target_id, items)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def hour_of(value: datetime, name: str, now: float) -> int:
    """A window bound as an hour index: aware or UTC, on an hour boundary (the SDK's contract)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    epoch = value.timestamp()
    if epoch % HOUR:
        raise InvalidRequest(f"{name}: must be aligned to a UTC hour boundary (minutes and seconds zero)")
    return int(epoch // HOUR)


def check_window(starting_on: datetime, ending_before: datetime, now: float) -> tuple[int, int]:
    first, end = hour_of(starting_on, "starting_on", now), hour_of(ending_before, "ending_before", now)
    if first * HOUR > now:
        raise InvalidRequest("starting_on: must not be in the future")
    if end <= first:
        raise InvalidRequest("ending_before: must be after starting_on")
    if end - first > MAX_WINDOW_HOURS:
        raise InvalidRequest("ending_before: at most 14 days after starting_on")
    return first, end


def storage_hours(checkpoints: list[CheckpointRecord], first: int, end: int,
                  now: float) -> dict[tuple[int, str], float]:
    """GB-hours per (hour, run) of checkpoints existing now, for the part of each hour they existed in."""
    out: dict[tuple[int, str], float] = defaultdict(float)
    for ck in checkpoints:
        if not ck.size_bytes:
            continue
        since = max(ck.created_at, first * HOUR)
        until = min(now, end * HOUR)
        hour = int(since // HOUR)
        while hour * HOUR < until:
            overlap = min(until, (hour + 1) * HOUR) - max(since, hour * HOUR)
            if overlap > 0:
                out[(hour, ck.run_id)] += ck.size_bytes / GIGABYTE * overlap / HOUR
            hour += 1
    return out


def _event(hour: int, session_id: str | None, base_model: str | None, project_id: str | None, tenant: str,
           info: dict[str, Any]) -> dict[str, Any]:
    """One `BillingUsageEvent`: the tenant is the user (no users apart from tenants here); no prices."""
    return {"bucket_start": _iso(hour * HOUR), "bucket_end": _iso((hour + 1) * HOUR), "base_model": base_model,
            "user_id": tenant, "user_name": tenant, "session_id": session_id,
            "project_id": (project_id or "default") if session_id else project_id, "estimated_cost_usd": None,
            "effective_rate_usd_per_million_tokens": None, "effective_rate_usd_per_gigabyte_month": None,
            "event_info": info}


class UsageService:
    def __init__(self, repo: AsyncRepo):
        self.repo = repo

    async def _base_models(self, target_ids: set[str]) -> dict[str, str | None]:
        """The base model of each run or sampling session."""
        found: dict[str, str | None] = {}
        for target in target_ids:
            model = await self.repo.get_model(target)
            sampler = None if model is not None else await self.repo.get_sampler(target)
            found[target] = model.base_model if model else sampler.base_model if sampler else None
        return found

    async def events(self, tenant: str, starting_on: datetime, ending_before: datetime) -> dict[str, Any]:
        """The SDK's `BillingUsageResponse` for the tenant's window."""
        now = time.time()
        first, end = check_window(starting_on, ending_before, now)
        rows: list[UsageRow] = await self.repo.usage_buckets(tenant, first, end)
        checkpoints: list[CheckpointRecord] = await self.repo.list_checkpoints(tenant=tenant, limit=100_000)
        storage = storage_hours(checkpoints, first, end, now)
        runs = {run: await self.repo.get_model(run) for _, run in storage}
        run_sessions = {run: (m.session_id if m else None) for run, m in runs.items()}
        base_models = await self._base_models({r.target_id for r in rows} | set(runs))
        session_ids = {r.session_id for r in rows if r.session_id} | {s for s in run_sessions.values() if s}
        projects = {s: e.project_id for s, e in (await self.repo.session_extras(sorted(session_ids))).items()}
        data: list[tuple[int, int, dict[str, Any]]] = []
        for r in rows:
            info: dict[str, Any] = ({"type": r.kind, "count": r.quantity} if r.kind == "checkpoint"
                                    else {"type": r.kind, "token_count": r.quantity})
            if r.kind == "sampling_prefill":
                info["cached"] = False
            data.append((r.hour, -r.quantity, _event(r.hour, r.session_id, base_models[r.target_id],
                                                     projects.get(r.session_id or ""), tenant, info)))
        for (hour, run), gb_hours in storage.items():
            info = {"type": "storage", "free": False, "gigabyte_hours": gb_hours}
            data.append((hour, 0, _event(hour, None, base_models[run], projects.get(run_sessions[run] or ""),
                                         tenant, info)))
        data.sort(key=lambda item: (item[0], item[1]))
        sessions: dict[str, Any] = {}
        for sid in sorted({d[2]["session_id"] for d in data if d[2]["session_id"]}):
            record = await self.repo.get_session(sid)
            sessions[sid] = {"user_metadata": None if record is None else record.user_metadata}
        return {"data": [d[2] for d in data], "sessions": sessions, "cost_data_through": None}

    async def current_storage(self, tenant: str, project_id: str | None) -> dict[str, Any]:
        """The SDK's `CurrentCheckpointStorageUsageResponse`: the tenant's checkpoints now, by project."""
        checkpoints: list[CheckpointRecord] = await self.repo.list_checkpoints(tenant=tenant, limit=100_000)
        runs = {ck.run_id for ck in checkpoints}
        sessions = {}
        for run in runs:
            model = await self.repo.get_model(run)
            sessions[run] = model.session_id if model else None
        extras = await self.repo.session_extras(sorted({s for s in sessions.values() if s}))
        groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for ck in checkpoints:
            sid = sessions.get(ck.run_id)
            project = (extras[sid].project_id if sid in extras else None) or "default"
            if project_id is not None and project != project_id:
                continue
            groups[project][0] += 1
            groups[project][1] += ck.size_bytes or 0
        return {"effective_rate_usd_per_gigabyte_month": None, "data": [
            {"project_id": project, "org_user_urn": tenant, "user_email": None, "user_name": tenant,
             "checkpoint_count": count, "size_bytes": size, "size_gigabytes": size / GIGABYTE,
             "estimated_monthly_cost_usd": None} for project, (count, size) in sorted(groups.items())]}
