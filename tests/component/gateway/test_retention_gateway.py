"""Retention against a real gateway process: audit and usage rows older than the configured days, written
into its store with old timestamps, are deleted by its periodic maintenance, while the AdminClient's audit
log and billing usage still answer the recent ones."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import tinker
from sqlalchemy import func, select

from tests.support.eventually import eventually_sync
from tests.support.sdk import DEV_KEY, metric_value, start_gateway
from tinkerkube_gateway.settings import LOCAL_DEV_TENANT
from tinkerkube_gateway.store import tables as t
from tinkerkube_gateway.store.ledger import HOUR, Usage
from tinkerkube_gateway.store.repo import Repo

DAY = 24 * 3600
OLD_DAYS = 20  # past the 10-day retention configured below


def _seed(db_url: str, now: float) -> None:
    """One old and one recent audit entry and usage record of the dev tenant, before the gateway starts."""
    repo = Repo(db_url)
    try:
        for at, tag in ((now - OLD_DAYS * DAY, "old"), (now, "new")):
            repo.audit(LOCAL_DEV_TENANT, at, "project_set", "projects", {"session_id": tag, "project_id": tag})
            with repo.engine.begin() as conn:
                repo.record_usage_in(conn, Usage(LOCAL_DEV_TENANT, None, "gone:train:0",
                                                 (("training", 7 if tag == "new" else 99),)), at)
    finally:
        repo.close()


def _rows(db_url: str) -> dict[str, int]:
    repo = Repo(db_url)
    try:
        with repo.engine.connect() as conn:
            return {tb.name: int(conn.execute(select(func.count()).select_from(tb)).scalar_one())
                    for tb in (t.audit_events, t.usage_events)}
    finally:
        repo.close()


def _hour_window(at: float) -> tuple[datetime, datetime]:
    start = datetime.fromtimestamp(at // HOUR * HOUR, UTC)
    return start, start + timedelta(hours=1)


def test_old_audit_and_usage_rows_age_out_and_recent_ones_still_answer(tmp_path: Path,
                                                                       model_cache_dir: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    db_url = f"sqlite:///{state / 'gateway.db'}"
    now = time.time()
    _seed(db_url, now)
    assert _rows(db_url) == {"audit_events": 2, "usage_events": 2}
    gw = start_gateway(state, model_cache_dir=model_cache_dir, extra_env={
        "TINKERKUBE_GATEWAY_AUDIT_RETENTION_DAYS": "10", "TINKERKUBE_GATEWAY_USAGE_RETENTION_DAYS": "10",
        "TINKERKUBE_GATEWAY_REAPER_INTERVAL_SECONDS": "0.2"})
    try:
        eventually_sync(lambda: (metric_value(gw, "tinkerkube_gateway_retention_pruned_rows_total",
                                              table="audit_events"),
                                 metric_value(gw, "tinkerkube_gateway_retention_pruned_rows_total",
                                              table="usage_events")),
                        lambda pruned: pruned == (1.0, 1.0), timeout=60, what="both old rows pruned")
        assert _rows(db_url) == {"audit_events": 1, "usage_events": 1}
        admin = tinker.AdminClient(base_url=gw.url, api_key=DEV_KEY)
        old = now - OLD_DAYS * DAY
        assert admin.get_audit_log(day=datetime.fromtimestamp(old, UTC).date()).result().entries == []
        today = admin.get_audit_log(day=datetime.fromtimestamp(now, UTC).date()).result().entries
        assert [(e.event, e.event_details["session_id"]) for e in today] == [("project_set", "new")]
        assert admin.get_billing_usage(*_hour_window(old)).result().data == []
        recent = admin.get_billing_usage(*_hour_window(now)).result().data
        assert [(e.event_info.type, e.event_info.token_count) for e in recent] == [("training", 7)]
    finally:
        gw.stop()
