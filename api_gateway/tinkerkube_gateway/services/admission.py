"""Sampling backpressure: how many samples a trainer pool and a tenant may have running, how many may
wait, and how many tokens a tenant may sample per minute.

Why in the gateway: a trainer batches every sample it is sent (continuous batching), so it never says
"full"; without a bound here one tenant's burst fills a pool's batch for everyone and a queue grows
without limit. A sample is admitted (its future exists), then starts when its pool has a free slot
(`pool_inflight`), its tenant is under `tenant_inflight` and has tokens left; until then it waits in its
pool's FIFO queue and its future reports `paused_capacity` (the pool is busy) or `paused_rate_limit` (the
tenant's own limits). When a pool's queue or the tenant's queued samples are at their bounds a new
asample is refused with 429 and Retry-After before anything is recorded (the SDK sends the same request
again a second later). Samples of other tenants may pass one held back by its tenant's limits.

Tokens: a sample reserves num_samples x max_tokens when it starts and gets back what it did not use
when it finishes; the bucket refills continuously (`tenant_tokens_per_minute` / 60 per second) up to one
minute's worth, and a start needs a positive balance, so one large request may overdraw it.

The bookkeeping is per gateway replica (in memory): with several replicas each applies the limits to
the samples it runs.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tinkerkube_gateway.errors import Backpressure
from tinkerkube_gateway.metrics import Metrics
from tinkerkube_gateway.services.futures import QueueState, QueueStatus
from tinkerkube_gateway.store.records import FutureRecord

# Runs the sample, told whether it waited here first (it may have been cancelled elsewhere meanwhile); the
# tokens it generated (None: unknown, or it did not run).
RunSample = Callable[[bool], Awaitable[int | None]]


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    pool_inflight: int = 64  # samples one trainer pool runs at once
    pool_queue: int = 1024  # samples waiting for one pool; a 429 beyond
    tenant_inflight: int = 0  # samples one tenant runs at once (0: no limit)
    tenant_queue: int = 1024  # samples one tenant has waiting; a 429 beyond
    tenant_tokens_per_minute: int = 0  # tokens one tenant may sample per minute (0: no limit)


@dataclass(eq=False)
class Ticket:
    request_id: str
    tenant: str
    pool: str
    cost: int  # tokens reserved at start: num_samples x max_tokens
    run: RunSample
    queued_at: float = 0.0
    held: QueueStatus | None = None  # why it waits (None: not examined yet, or free to start)
    waited: bool = False  # it did not start when it was admitted


@dataclass
class _Tenant:
    inflight: int = 0
    queued: int = 0
    tokens: float = 0.0
    refilled_at: float = 0.0


@dataclass
class _Pool:
    inflight: int = 0
    queue: collections.deque[Ticket] = field(default_factory=collections.deque)


class SampleAdmission:
    def __init__(self, limits: AdmissionLimits, metrics: Metrics, spawn: Callable[[Awaitable[None]], None], *,
                 clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.metrics = metrics
        self._spawn = spawn
        self._clock = clock
        self._pools: dict[str, _Pool] = {}
        self._tenants: dict[str, _Tenant] = {}
        self._queued: dict[str, Ticket] = {}  # request_id -> a ticket still waiting
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    # ------------------------------------------------------------------ submit side

    def check(self, tenant: str, pool: str) -> None:
        """Backpressure (429) when a new sample of `tenant` on `pool` could not even wait."""
        queued = len(self._pools[pool].queue) if pool in self._pools else 0
        if queued >= self.limits.pool_queue:
            self.metrics.samples_rejected_total.labels(tenant=tenant, reason="pool_queue_full").inc()
            raise Backpressure(f"the sampler is saturated ({queued} samples waiting for it); retry shortly", 1.0)
        state = self._tenant(tenant)
        if state.queued >= self.limits.tenant_queue:
            self.metrics.samples_rejected_total.labels(tenant=tenant, reason="tenant_queue_full").inc()
            raise Backpressure(f"you have {state.queued} samples waiting (the limit of this gateway); retry "
                               "shortly", max(1.0, self._seconds_to_tokens(state)))

    def admit(self, ticket: Ticket) -> None:
        """The ticket's future exists: start it now, or queue it (never refused here)."""
        ticket.queued_at = self._clock()
        self._pools.setdefault(ticket.pool, _Pool()).queue.append(ticket)
        self._tenant(ticket.tenant).queued += 1
        self._queued[ticket.request_id] = ticket
        self._pump()

    def withdraw(self, request_id: str) -> bool:
        """Drops a ticket that is still waiting (a cancel): True when it never started."""
        ticket = self._queued.pop(request_id, None)
        if ticket is None:
            return False
        self._pools[ticket.pool].queue.remove(ticket)
        self._tenant(ticket.tenant).queued -= 1
        self._pump()
        return True

    def status(self, record: FutureRecord) -> QueueStatus | None:
        """A `QueueStateSource`: why a waiting sample waits; None for anything not waiting here."""
        ticket = self._queued.get(record.request_id)
        return None if ticket is None else ticket.held or QueueStatus(QueueState.PAUSED_CAPACITY)

    # ------------------------------------------------------------------ scheduling

    def _tenant(self, tenant: str) -> _Tenant:
        state = self._tenants.get(tenant)
        if state is None:
            per_minute = self.limits.tenant_tokens_per_minute
            state = self._tenants[tenant] = _Tenant(tokens=float(per_minute), refilled_at=self._clock())
        return state

    def _refill(self, state: _Tenant, now: float) -> None:
        per_minute = self.limits.tenant_tokens_per_minute
        if per_minute > 0:
            state.tokens = min(float(per_minute), state.tokens + (now - state.refilled_at) * per_minute / 60.0)
        state.refilled_at = now

    def _seconds_to_tokens(self, state: _Tenant) -> float:
        per_minute = self.limits.tenant_tokens_per_minute
        if per_minute <= 0 or state.tokens > 0:
            return 0.0
        return (-state.tokens + 1.0) * 60.0 / per_minute

    def _hold(self, ticket: Ticket, pool: _Pool, now: float) -> QueueStatus | None:
        """Why `ticket` cannot start now, or None when it can."""
        if pool.inflight >= self.limits.pool_inflight:
            return QueueStatus(QueueState.PAUSED_CAPACITY,
                               f"the sampler is running {pool.inflight} samples; this one is queued")
        state = self._tenant(ticket.tenant)
        if 0 < self.limits.tenant_inflight <= state.inflight:
            return QueueStatus(QueueState.PAUSED_RATE_LIMIT,
                               f"you have {state.inflight} samples running, the most this gateway runs at once")
        if self.limits.tenant_tokens_per_minute > 0:
            self._refill(state, now)
            if state.tokens <= 0:
                return QueueStatus(QueueState.PAUSED_RATE_LIMIT, f"you sampled your "
                                   f"{self.limits.tenant_tokens_per_minute} tokens per minute; waiting for more")
        return None

    def _pump(self) -> None:
        if self._closed:  # shutting down: nothing new starts
            return
        now = self._clock()
        token_wait: float | None = None
        for pool_key, pool in list(self._pools.items()):
            for ticket in list(pool.queue):
                ticket.held = self._hold(ticket, pool, now)
                if ticket.held is None:
                    self._start(ticket, pool)
                    continue
                ticket.waited = True
                if ticket.held.state is QueueState.PAUSED_RATE_LIMIT:
                    wait = self._seconds_to_tokens(self._tenant(ticket.tenant))
                    if wait > 0:
                        token_wait = wait if token_wait is None else min(token_wait, wait)
            if not pool.queue and pool.inflight == 0:
                del self._pools[pool_key]
        self._arm(token_wait)
        self._publish()

    def _arm(self, delay: float | None) -> None:
        """Wake the pump when a rate-limited tenant will have tokens again (nothing else frees them)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if delay is not None:
            self._timer = asyncio.get_running_loop().call_later(delay, self._pump)

    def _start(self, ticket: Ticket, pool: _Pool) -> None:
        pool.queue.remove(ticket)
        self._queued.pop(ticket.request_id, None)
        state = self._tenant(ticket.tenant)
        state.queued -= 1
        state.inflight += 1
        pool.inflight += 1
        if self.limits.tenant_tokens_per_minute > 0:
            state.tokens -= ticket.cost
        self.metrics.sample_wait_seconds.observe(max(0.0, self._clock() - ticket.queued_at))
        self._spawn(self._run(ticket))

    async def _run(self, ticket: Ticket) -> None:
        used: int | None = None
        try:
            used = await ticket.run(ticket.waited)
        finally:
            self._finished(ticket, used)

    def _finished(self, ticket: Ticket, used: int | None) -> None:
        state = self._tenant(ticket.tenant)
        state.inflight -= 1
        pool = self._pools.setdefault(ticket.pool, _Pool())
        pool.inflight -= 1
        if used is not None:
            self.metrics.sampled_tokens_total.labels(tenant=ticket.tenant).inc(used)
            if self.limits.tenant_tokens_per_minute > 0:
                state.tokens += max(0, ticket.cost - used)  # what it reserved and did not use
        self._pump()

    def _publish(self) -> None:
        by_reason: dict[tuple[str, str], int] = collections.Counter()
        for ticket in self._queued.values():
            reason = "rate_limit" if ticket.held is not None and \
                ticket.held.state is QueueState.PAUSED_RATE_LIMIT else "capacity"
            by_reason[(ticket.tenant, reason)] += 1
        for tenant, state in self._tenants.items():
            self.metrics.samples_inflight.labels(tenant=tenant).set(state.inflight)
            for reason in ("capacity", "rate_limit"):
                self.metrics.samples_queued.labels(tenant=tenant, reason=reason).set(by_reason[(tenant, reason)])

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
