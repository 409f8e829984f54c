"""Custom losses: `create_custom_loss` stores a validated graph per session, `forward_backward` with
`loss_fn="custom"` runs it on the trainer.

Why the graph travels in the op body: the gateway puts the stored loss into the forward_backward it
logs (`loss_fn_config_v2[SPEC_CONFIG_KEY]`), so the trainer needs no store and a run replayed after a
trainer or gateway crash runs exactly the loss it ran before. The create is a future like the other
ops, under `(<session_id>/custom_losses, custom_loss_seq_id)`: a retried create finds its first answer,
a refused graph fails the future with the contract's message and consumes the seq_id, leaving the
session as it was. A loss_id only opens for runs of the session (and tenant) that created it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tinker.proto import tinker_public_pb2 as pb

from tinkerkube_contract import custom_loss
from tinkerkube_contract.pod_api import CONTENT_JSON, ErrorCategory
from tinkerkube_gateway.errors import InvalidRequest
from tinkerkube_gateway.metrics import Metrics
from tinkerkube_gateway.schemas import CreateCustomLossRequest
from tinkerkube_gateway.services.futures import FuturesService
from tinkerkube_gateway.services.models import ModelsService
from tinkerkube_gateway.services.sessions import SessionsService
from tinkerkube_gateway.store.records import CustomLossRecord, FutureOp, FutureRecord, FutureState
from tinkerkube_gateway.store.repo import AsyncRepo


def target_id(session_id: str) -> str:
    """The futures target under which a session's creates are numbered."""
    return f"{session_id}/custom_losses"


class CustomLossService:
    def __init__(self, *, repo: AsyncRepo, futures: FuturesService, sessions: SessionsService,
                 models: ModelsService, metrics: Metrics) -> None:
        self.repo, self.futures, self.sessions, self.models, self.metrics = repo, futures, sessions, models, metrics

    async def create(self, tenant: str, req: CreateCustomLossRequest) -> FutureRecord:
        await self.sessions.get_active(tenant, req.session_id)
        request = {"name": req.name, "inputs": req.inputs, "graph": req.graph}
        body = json.dumps(request, separators=(",", ":"), sort_keys=True).encode()
        fut, created = await self.futures.create(tenant=tenant, session_id=req.session_id,
                                                 target_id=target_id(req.session_id), seq_id=req.custom_loss_seq_id,
                                                 op=FutureOp.CREATE_CUSTOM_LOSS, body=body, body_type=CONTENT_JSON)
        if not created and fut.state != FutureState.PENDING:
            return fut  # a retried create: its first answer
        try:
            custom_loss.parse(request)
        except custom_loss.CustomLossError as exc:
            self.metrics.custom_losses_total.labels(outcome="refused").inc()
            await self.futures.fail(fut, f"create_custom_loss: {exc}", ErrorCategory.USER)
            return fut
        loss_id = "loss-" + fut.request_id.removeprefix("req-")
        await self.repo.insert_custom_loss(CustomLossRecord(loss_id=loss_id, tenant=tenant, session_id=req.session_id,
                                                            name=req.name, spec=body, created_at=fut.created_at))
        result = json.dumps({"loss_id": loss_id, "type": "create_custom_loss"}).encode()
        if await self.futures.complete(fut, result, CONTENT_JSON):
            self.metrics.custom_losses_total.labels(outcome="created").inc()
        return fut

    async def attach(self, tenant: str, model_id: str, plain: bytes, *, inline: bool = True) -> bytes:
        """A `loss_fn="custom"` forward_backward body with its session's stored loss put in (any other body
        unchanged); InvalidRequest (the seq_id consumed) for a loss_id that is unknown or another session's.
        `inline=False`: a large body, parsed and written in a worker thread (never on the event loop)."""
        msg = _parse(plain) if inline else await asyncio.to_thread(_parse, plain)
        if msg.loss_fn != custom_loss.CUSTOM_LOSS_FN:
            return plain
        loss_id = _loss_id(msg)
        model = await self.models.get_owned(tenant, model_id)
        record = await self.repo.get_custom_loss(loss_id)
        if record is None or record.tenant != tenant:
            raise InvalidRequest(f"forward_backward: unknown custom loss_id {loss_id!r}; create it with "
                                 "ServiceClient.create_custom_loss in this session")
        if record.session_id != model.session_id:
            raise InvalidRequest(f"forward_backward: custom loss {loss_id!r} belongs to session {record.session_id}, "
                                 f"not to {model.session_id} (the session of {model_id}); create it in this session")
        msg.loss_fn_config_v2[custom_loss.SPEC_CONFIG_KEY].text = record.spec.decode()
        return msg.SerializeToString() if inline else await asyncio.to_thread(msg.SerializeToString)


def _parse(plain: bytes) -> Any:
    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(plain)  # wire.check_forward_backward parsed it already: it cannot fail
    return msg


def _loss_id(msg: Any) -> str:
    value = msg.loss_fn_config_v2.get(custom_loss.LOSS_ID_KEY)
    if value is None or value.WhichOneof("value") != "text" or not value.text:
        raise InvalidRequest("forward_backward: loss_fn 'custom' needs loss_fn_config['loss_id'] (a LossHandle "
                             "from ServiceClient.create_custom_loss)")
    if custom_loss.SPEC_CONFIG_KEY in msg.loss_fn_config_v2:
        raise InvalidRequest(f"forward_backward: loss_fn_config[{custom_loss.SPEC_CONFIG_KEY!r}] is the gateway's "
                             "own; send loss_id only")
    return value.text[:200]
