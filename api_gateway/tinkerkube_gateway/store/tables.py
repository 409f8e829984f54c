"""SQLAlchemy Core tables, one schema for SQLite (default, WAL) and PostgreSQL (by URL).

Times are float epoch seconds (portable across both dialects); free-form maps are JSON.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

sessions = Table(
    "sessions", metadata,
    Column("session_id", String(200), primary_key=True),
    Column("tenant", String(200), nullable=False, index=True),
    Column("status", String(20), nullable=False),  # active | finished | reaped
    Column("created_at", Float, nullable=False),
    Column("last_heartbeat", Float, nullable=False),
    Column("user_metadata", JSON, nullable=True),
    Column("tags", JSON, nullable=True),
    Column("display_name", Text, nullable=True),
    Column("ended_reason", Text, nullable=True),
)

# Every trainer process group: training runs (kind=train) and started samplers (kind=sample).
models = Table(
    "models", metadata,
    Column("model_id", String(250), primary_key=True),
    Column("session_id", String(200), nullable=False, index=True),
    Column("tenant", String(200), nullable=False, index=True),
    Column("kind", String(10), nullable=False),  # train | sample
    Column("base_model", Text, nullable=False),
    Column("lora", JSON, nullable=True),
    Column("user_metadata", JSON, nullable=True),
    Column("optimizer_config", JSON, nullable=True),
    Column("restore_from", Text, nullable=True),
    Column("weights_key", Text, nullable=True),  # samplers: what they serve (path or base model)
    Column("status", String(20), nullable=False),  # starting | ready | stopped | failed
    Column("error", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("last_request_time", Float, nullable=False),
)

samplers = Table(
    "samplers", metadata,
    Column("sampler_id", String(250), primary_key=True),
    Column("session_id", String(200), nullable=False, index=True),
    Column("tenant", String(200), nullable=False, index=True),
    Column("base_model", Text, nullable=False),
    Column("model_path", Text, nullable=True),
    Column("backing_model_id", String(250), nullable=False),  # the trainer process that serves it
    Column("snapshot_id", Text, nullable=True),  # SampleOp.snapshot_id on that trainer
    Column("created_at", Float, nullable=False),
)

futures = Table(
    "futures", metadata,
    Column("request_id", String(64), primary_key=True),
    Column("tenant", String(200), nullable=False),
    Column("session_id", String(200), nullable=True),
    Column("target_id", String(250), nullable=False),  # model_id, or sampler_id for samples
    Column("seq_id", BigInteger, nullable=True),  # samples of unpickled SamplingClients: clone_id * 1e9 + n
    Column("trainer_seq", Integer, nullable=True),  # the seq the trainer knows it by (rejected ops take none)
    Column("op", String(40), nullable=False),
    Column("state", String(10), nullable=False),  # pending | complete | failed
    Column("body", LargeBinary, nullable=True),  # the op log: what is forwarded (and replayed)
    Column("body_type", String(40), nullable=True),
    Column("meta", JSON, nullable=True),  # how to turn the trainer's result into the SDK's (ttl, names)
    Column("result", LargeBinary, nullable=True),
    Column("result_type", String(40), nullable=True),
    Column("error", Text, nullable=True),
    Column("category", String(10), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("completed_at", Float, nullable=True),
    UniqueConstraint("target_id", "seq_id", name="uq_futures_target_seq"),
    Index("ix_futures_state", "state"),
    Index("ix_futures_session", "session_id"),  # the session trace export
    # A run's most recently changed futures (status.futures.recent) without sorting all of its futures.
    Index("ix_futures_target_completed", "target_id", "completed_at"),
    Index("ix_futures_target_pending", "target_id", "state", "created_at"),
)
# create_all makes indexes only with their table: Repo creates these on stores made before they existed.
LATER_FUTURES_INDEXES = [i for i in futures.indexes if i.name in (
    "ix_futures_session", "ix_futures_target_completed", "ix_futures_target_pending")]

# Each target's futures counted as they are inserted and finished, in the same transactions: what the
# futures aggregates (status.futures) read in one keyed row, where counting a long run's futures on every
# status flush grew with the run (~0.2 s of CPU per flush at 50,000 futures, measured).
run_counters = Table(
    "run_counters", metadata,
    Column("target_id", String(250), primary_key=True),
    Column("submitted", BigInteger, nullable=False),
    Column("completed", BigInteger, nullable=False),
    Column("failed", BigInteger, nullable=False),
    Column("last_seq_id", BigInteger, nullable=True),
    Column("last_completed_seq_id", BigInteger, nullable=True),
)

# Which gateway replica dispatches a run (model) now. `epoch` grows at every takeover and fences the
# op log: a replica writes a trainer seq only while it still holds the lease at its epoch.
run_leases = Table(
    "run_leases", metadata,
    Column("model_id", String(250), primary_key=True),
    Column("owner", String(64), nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("expires_at", Float, nullable=False),
)

checkpoints = Table(
    "checkpoints", metadata,
    Column("tinker_path", String(500), primary_key=True),
    Column("run_id", String(250), nullable=False, index=True),
    Column("tenant", String(200), nullable=False, index=True),
    Column("kind", String(20), nullable=False),
    Column("name", String(200), nullable=False),
    Column("size_bytes", BigInteger, nullable=True),
    Column("public", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True),
    Column("user_metadata", JSON, nullable=True),
)

# What the Tinker API says of a session beyond the `sessions` row (its own table: the older row needs no
# migration): the project (create_session, PUT /sessions/{id}/project) and how the client finished it.
session_extras = Table(
    "session_extras", metadata,
    Column("session_id", String(200), primary_key=True),
    Column("project_id", String(200), nullable=True, index=True),
    Column("finish_reason", String(20), nullable=True),  # success | errored | interrupted (client_finished)
)

# Completions of sample futures, per sampling session, in commit order: what `retrieve_futures` reports.
# `serial` comes from `future_event_counters` in the finishing transaction (the counter row stays locked
# until commit), so a reader that has seen serial n has seen every completion before it.
future_events = Table(
    "future_events", metadata,
    Column("target_id", String(250), primary_key=True),  # the sampling session (sampler_id)
    Column("serial", BigInteger, primary_key=True),
    Column("clone", Integer, nullable=False),  # seq_id // 1e9: the (unpickled) SamplingClient copy
    Column("request_id", String(64), nullable=False),
    Column("state", String(10), nullable=False),  # complete | failed
    Column("size", BigInteger, nullable=True),  # the result's bytes (the SDK reserves them before fetching)
    Column("created_at", Float, nullable=False, index=True),
)

future_event_counters = Table(
    "future_event_counters", metadata,
    Column("target_id", String(250), primary_key=True),
    Column("last", BigInteger, nullable=False),
)

# Custom losses uploaded with create_custom_loss (the validated wire graph as JSON): a session's
# forward_backward names one by loss_id, and the gateway puts its graph in the op body it logs.
custom_losses = Table(
    "custom_losses", metadata,
    Column("loss_id", String(64), primary_key=True),
    Column("tenant", String(200), nullable=False),
    Column("session_id", String(200), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("spec", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
)

# Gateway-wide secrets every replica must share (the key signing download URLs), created on first use.
gateway_secrets = Table(
    "gateway_secrets", metadata,
    Column("name", String(64), primary_key=True),
    Column("value", LargeBinary, nullable=False),
)

# The clone ids `join_sampling_session` hands out, per sampling session (the original client is 0): the
# same upsert counter as `future_event_counters`, so replicas sharing the store never hand out one twice.
sampling_clone_counters = Table(
    "sampling_clone_counters", metadata,
    Column("target_id", String(250), primary_key=True),  # the sampling session (sampler_id)
    Column("last", BigInteger, nullable=False),
)

# API keys revoked through DELETE /api/v1/auth/apikey/me, by fingerprint (never the key itself): every
# replica refuses them (services/keys.py), whatever the configured keys say.
revoked_keys = Table(
    "revoked_keys", metadata,
    Column("fingerprint", String(64), primary_key=True),
    Column("tenant", String(200), nullable=False),
    Column("revoked_at", Float, nullable=False),
)

# The tenant's own state-changing calls, for GET /api/v1/audit (services/audit.py).
audit_events = Table(
    "audit_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tenant", String(200), nullable=False),
    Column("at", Float, nullable=False),
    Column("event", String(60), nullable=False),  # <resource>_<action>, e.g. checkpoint_delete
    Column("category", String(20), nullable=False),  # checkpoints | projects | organizations
    Column("details", JSON, nullable=False),
    Index("ix_audit_tenant_at", "tenant", "at"),
    Index("ix_audit_at", "at"),  # retention: the oldest rows of every tenant (store/ledger.py prune_audit_before)
)

# What each finished op used, for GET /api/v1/billing/usage/events (services/usage.py): written in the
# transaction that finishes its future, so an op is counted exactly once whichever replica finishes it.
usage_events = Table(
    "usage_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tenant", String(200), nullable=False),
    Column("session_id", String(200), nullable=True),
    Column("target_id", String(250), nullable=False),  # the run (model_id) or sampling session (sampler_id)
    Column("kind", String(20), nullable=False),  # training | sampling_prefill | sampling_sample | checkpoint
    Column("quantity", BigInteger, nullable=False),  # tokens, or checkpoints
    Column("hour", Integer, nullable=False),  # the UTC hour bucket: int(at // 3600)
    Index("ix_usage_tenant_hour", "tenant", "hour"),
    Index("ix_usage_hour", "hour"),  # retention: the oldest rows of every tenant (prune_usage_before)
)

# Indexes added after their tables shipped: create_all makes indexes only with their table, so Repo creates
# these on stores made before they existed.
LATER_INDEXES = [*LATER_FUTURES_INDEXES, *(i for i in (*audit_events.indexes, *usage_events.indexes)
                                          if i.name in ("ix_audit_at", "ix_usage_hour"))]
