"""Prometheus collectors of one gateway, on a registry of its own (several apps can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests_total = Counter("tinkerkube_gateway_requests_total", "HTTP requests by endpoint and status",
                                      ["endpoint", "status"], registry=r)
        self.request_seconds = Histogram("tinkerkube_gateway_request_seconds", "HTTP request latency",
                                         ["endpoint"], buckets=_BUCKETS, registry=r)
        self.future_seconds = Histogram("tinkerkube_gateway_future_seconds", "future latency, submit to complete",
                                        ["op"], buckets=_BUCKETS, registry=r)
        self.queue_depth = Gauge("tinkerkube_gateway_queue_depth", "pending futures", registry=r)
        self.active_sessions = Gauge("tinkerkube_gateway_active_sessions", "sessions not finished or reaped",
                                     registry=r)
        self.custom_losses_total = Counter("tinkerkube_gateway_custom_losses_total",
                                           "create_custom_loss requests by outcome (created, refused)",
                                           ["outcome"], registry=r)
        self.futures_total = Counter("tinkerkube_gateway_futures_total", "finished futures by op and outcome",
                                     ["op", "outcome"], registry=r)
        # Sampling backpressure (services/admission.py), per tenant: the tenants are the configured API keys'.
        self.samples_inflight = Gauge("tinkerkube_gateway_samples_inflight", "samples running on trainers",
                                      ["tenant"], registry=r)
        self.samples_queued = Gauge("tinkerkube_gateway_samples_queued", "samples waiting in the gateway, by "
                                    "what holds them (capacity: the pool; rate_limit: the tenant's limits)",
                                    ["tenant", "reason"], registry=r)
        self.samples_rejected_total = Counter("tinkerkube_gateway_samples_rejected_total",
                                              "asample requests answered 429 (a full queue)", ["tenant", "reason"],
                                              registry=r)
        self.sampled_tokens_total = Counter("tinkerkube_gateway_sampled_tokens_total", "tokens sampled",
                                            ["tenant"], registry=r)
        self.sample_wait_seconds = Histogram("tinkerkube_gateway_sample_wait_seconds",
                                             "time a sample waited in the gateway before it started",
                                             buckets=_BUCKETS, registry=r)
        # Image asset pointers (services/image_assets.py): source url|file, outcome ok|disabled|not_allowed|
        # failed|too_large|bad_image|timeout.
        self.image_asset_fetches_total = Counter("tinkerkube_gateway_image_asset_fetches_total",
                                                 "image_asset_pointer chunks resolved, by source and outcome",
                                                 ["source", "outcome"], registry=r)
        self.image_asset_fetch_seconds = Histogram("tinkerkube_gateway_image_asset_fetch_seconds",
                                                   "time resolving one image_asset_pointer chunk", ["source"],
                                                   buckets=_BUCKETS, registry=r)

        # Credentials (services/keys.py).
        self.auth_tokens_issued_total = Counter("tinkerkube_gateway_auth_tokens_issued_total",
                                                "JWTs minted by POST /api/v1/auth/token", ["tenant"], registry=r)
        self.auth_rejected_total = Counter("tinkerkube_gateway_auth_rejected_total", "credentials refused (401), "
                                           "by why: missing, unknown, revoked, invalid_token", ["reason"], registry=r)
        self.api_keys_revoked_total = Counter("tinkerkube_gateway_api_keys_revoked_total",
                                              "API keys revoked by their holder (DELETE /api/v1/auth/apikey/me), "
                                              "on this replica", ["tenant"], registry=r)
        # Retention (services/retention.py), by table: audit_events, usage_events.
        self.retention_pruned_total = Counter("tinkerkube_gateway_retention_pruned_rows_total",
                                              "audit and usage rows deleted past their retention, by table, "
                                              "by this replica", ["table"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
