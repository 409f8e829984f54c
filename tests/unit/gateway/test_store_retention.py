"""Retention of the audit log and usage records on SQLite and PostgreSQL: rows older than the cutoff go,
a bounded batch a pass, newer rows stay, 0 days keeps everything, and stores made before the time indexes
get them when opened."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from pydantic import ValidationError
from sqlalchemy import func, inspect, select, text

from tests.support.store import reopened
from tinkerkube_gateway.metrics import Metrics
from tinkerkube_gateway.services.retention import DAY, Retention
from tinkerkube_gateway.settings import GatewaySettings
from tinkerkube_gateway.store import tables as t
from tinkerkube_gateway.store.ledger import HOUR, Usage
from tinkerkube_gateway.store.repo import AsyncRepo, Repo


def _count(repo: Repo, table: t.Table) -> int:
    with repo.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _usage(repo: Repo, tenant: str, at: float) -> None:
    with repo.engine.begin() as conn:
        repo.record_usage_in(conn, Usage(tenant, "s", "s:train:0", (("training", 10),)), at)


def _history(repo: Repo, now: float) -> None:
    """Per tenant: 7 audit and usage records 30-36 days old, 3 of 1-3 days old."""
    for tenant in ("alice", "bob"):
        for age_days in (30, 31, 32, 33, 34, 35, 36, 1, 2, 3):
            at = now - age_days * DAY
            repo.audit(tenant, at, "session_create", "organizations", {"age": age_days})
            _usage(repo, tenant, at)


def _prune(repo: Repo, metrics: Metrics, *, days: int, batch: int) -> None:
    asyncio.run(Retention(AsyncRepo(repo), metrics, audit_days=days, usage_days=days, batch=batch).prune())


def _pruned(metrics: Metrics, table: str) -> float:
    return metrics.registry.get_sample_value("tinkerkube_gateway_retention_pruned_rows_total", {"table": table}) or 0


def test_rows_past_the_retention_go_a_bounded_batch_a_pass_and_newer_ones_stay(repo: Repo) -> None:
    now = time.time()
    _history(repo, now)
    metrics = Metrics()
    _prune(repo, metrics, days=10, batch=5)
    assert _count(repo, t.audit_events) == 20 - 5 and _count(repo, t.usage_events) == 20 - 5
    assert _pruned(metrics, "audit_events") == 5 and _pruned(metrics, "usage_events") == 5
    for _ in range(3):  # 14 old rows per table: two more passes, the third deletes nothing
        _prune(repo, metrics, days=10, batch=5)
    assert _pruned(metrics, "audit_events") == 14 and _pruned(metrics, "usage_events") == 14
    for tenant in ("alice", "bob"):
        kept = repo.audit_events(tenant, 0, now + 1, None, 100)
        assert sorted(r.details["age"] for r in kept) == [1, 2, 3]
        hours = [r.hour for r in repo.usage_buckets(tenant, 0, int(now // HOUR) + 1)]
        assert sorted(hours) == sorted(int((now - d * DAY) // HOUR) for d in (1, 2, 3))


def test_the_oldest_rows_go_first(repo: Repo) -> None:
    now = time.time()
    _history(repo, now)
    assert repo.prune_audit_before(now - 10 * DAY, 3) == 3
    ages = Counter(r.details["age"] for tenant in ("alice", "bob")
                   for r in repo.audit_events(tenant, 0, now, None, 100))
    assert ages == Counter({1: 2, 2: 2, 3: 2, 30: 2, 31: 2, 32: 2, 33: 2, 34: 2, 35: 1})  # both 36s, one 35


def test_zero_days_keeps_everything(repo: Repo) -> None:
    _history(repo, time.time() - 1000 * DAY)
    metrics = Metrics()
    _prune(repo, metrics, days=0, batch=1000)
    assert _count(repo, t.audit_events) == 20 and _count(repo, t.usage_events) == 20
    assert _pruned(metrics, "audit_events") == 0 and _pruned(metrics, "usage_events") == 0


def test_a_store_made_before_the_time_indexes_gets_them_when_opened(repo: Repo) -> None:
    with repo.engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_audit_at"))
        conn.execute(text("DROP INDEX ix_usage_hour"))
    with reopened(repo) as again:
        names = {i["name"] for table in ("audit_events", "usage_events")
                 for i in inspect(again.engine).get_indexes(table)}
        assert {"ix_audit_at", "ix_usage_hour"} <= names


@pytest.mark.parametrize("field", ["audit_retention_days", "usage_retention_days"])
def test_retention_days_out_of_range_are_refused_at_startup(field: str) -> None:
    assert getattr(GatewaySettings(), field) == 400
    for bad in (-1, 36_501):
        with pytest.raises(ValidationError, match=field):
            GatewaySettings(**{field: bad})
    assert getattr(GatewaySettings(**{field: 0}), field) == 0
