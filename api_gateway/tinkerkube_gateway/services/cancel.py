"""cancel_future: a pending future fails now with a clear message, and its seq_id stays used.

What cancelling does depends on where the op is; nothing that already ran, or runs, on a trainer can be
undone, and the answer says which case it was:
- a sample waiting in the gateway (backpressure) never starts;
- a sample already sent to its trainer fails now, and its trainer is told to stop it (`DELETE` on its sample
  path: its rows leave the decode at the next step). Sampling changes no state, so nothing else is left;
- a training op still waiting in its run's queue here is taken out: it never runs, and the ops after it go
  on as after any failed op;
- a training op already forwarded to the trainer (or dispatched by another gateway replica) is not
  cancelled: it changes the run's weights or state whatever the gateway says, so failing its future would
  misreport the run. It completes as usual; the answer says `cancelled: false`;
- a run's creation is not cancelled (finish the session, or stop using the client).
The SDK cancels only samples it abandoned (dynamic config `sample_cancel_enabled`).
"""

from __future__ import annotations

from pydantic import BaseModel

from tinkerkube_contract.pod_api import ErrorCategory
from tinkerkube_gateway.dispatcher import Dispatcher
from tinkerkube_gateway.services.futures import FuturesService
from tinkerkube_gateway.services.sampling import SamplingService
from tinkerkube_gateway.store.records import CREATE_OPS, FutureOp, FutureRecord, FutureState

CANCELLED = "cancelled by the client (cancel_future)"


class CancelOutcome(BaseModel):
    request_id: str
    cancelled: bool
    state: FutureState  # the future's state after the call
    detail: str


class CancelService:
    def __init__(self, futures: FuturesService, dispatcher: Dispatcher, sampling: SamplingService):
        self.futures = futures
        self.dispatcher = dispatcher
        self.sampling = sampling

    async def cancel(self, tenant: str, request_id: str) -> CancelOutcome:
        fut = await self.futures.get_owned(tenant, request_id)  # another tenant's is unknown (404)
        if fut.state != FutureState.PENDING:
            return CancelOutcome(request_id=request_id, cancelled=False, state=fut.state,
                                 detail=f"the {fut.op} had already finished ({fut.state})")
        if fut.op == FutureOp.SAMPLE:
            queued = await self.sampling.withdraw(request_id)
            detail = (f"{CANCELLED}: it never started" if queued else
                      f"{CANCELLED}; the trainer running it stops it at its next decode step")
            return await self._fail(fut, detail)
        if fut.op in CREATE_OPS:
            return CancelOutcome(request_id=request_id, cancelled=False, state=fut.state,
                                 detail="a run's creation cannot be cancelled; finish the session instead")
        if self.dispatcher.withdraw(fut):
            detail = f"{CANCELLED} before it reached the trainer: it never ran, and seq_id {fut.seq_id} is used"
            return await self._fail(fut, detail)
        return CancelOutcome(request_id=request_id, cancelled=False, state=fut.state,
                             detail=f"the {fut.op} already went to the trainer; it cannot be undone and completes "
                                    "as usual")

    async def _fail(self, fut: FutureRecord, detail: str) -> CancelOutcome:
        if await self.futures.fail(fut, detail, ErrorCategory.USER):
            return CancelOutcome(request_id=fut.request_id, cancelled=True, state=FutureState.FAILED, detail=detail)
        now = await self.futures.get_owned(fut.tenant, fut.request_id)  # it finished first: that stands
        return CancelOutcome(request_id=fut.request_id, cancelled=False, state=now.state,
                             detail=f"the {fut.op} finished ({now.state}) before it could be cancelled")
