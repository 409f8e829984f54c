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
    Column("seq_id", Integer, nullable=True),
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
