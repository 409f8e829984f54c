"""The trainer's entry point, started by torchrun on every rank: `python -m tinkerkube_trainer.main`.

The composition root: settings and torchrun's variables are read here, once, and passed down. Every
rank joins the group and builds the engine; rank 0 also serves the pod API on HOST:PORT (port 0
picks a free port, logged as the `listening` event) while the others run the worker loop. Logs are
one JSON object per line. SIGTERM on rank 0 finishes the running op, releases the other ranks and
exits 0; a failure on any rank exits non-zero so torchrun tears the whole group down.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from pydantic import ValidationError

from tinkerkube_trainer import distributed as d
from tinkerkube_trainer.engine_api import Engine, PoolConfig
from tinkerkube_trainer.http_api import create_app
from tinkerkube_trainer.scheduler import Limits
from tinkerkube_trainer.server import Booted, RuntimeOptions, TrainerRuntime
from tinkerkube_trainer.settings import DistEnv, TrainerSettings

log = logging.getLogger("tinkerkube_trainer.main")

_RECORD_FIELDS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName", "color_message"}


class JsonFormatter(logging.Formatter):
    def __init__(self, static: dict[str, Any]) -> None:
        super().__init__()
        self.static = static

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            **self.static,
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(level: str, dist_env: DistEnv) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter({"rank": dist_env.rank, "pid": os.getpid()}))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def load_factory(spec: str) -> Callable[[PoolConfig, Any], Engine]:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr or "build_engine")  # type: ignore[no-any-return]


def build_rank(settings: TrainerSettings, dist_env: DistEnv) -> tuple[d.DistContext, Engine]:
    """Join the group, build the engine, wait for every rank to have done the same."""
    started = time.monotonic()
    ctx = d.init_distributed(dist_env, device=settings.device, collective_timeout_s=settings.collective_timeout_seconds)
    engine = load_factory(settings.engine_factory)(settings.pool_config(), ctx.collective)
    pids = d.join(ctx, engine)
    log.info("rank joined", extra={"world_size": ctx.world_size, "device": str(ctx.device), "pids": pids,
                                   "boot_seconds": round(time.monotonic() - started, 3)})
    return ctx, engine


def run_follower(settings: TrainerSettings, dist_env: DistEnv) -> int:
    try:
        ctx, engine = build_rank(settings, dist_env)
    except Exception as exc:
        log.exception("boot failed")
        d.fatal("boot failed on a worker rank", error=repr(exc))
    d.worker_loop(ctx, engine)
    d.shutdown(ctx)
    log.info("rank stopped")
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this. Without it Nagle + delayed ACK stall every keep-alive reply
    # ~44 ms (measured), which would dominate small ops such as optim_step.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_leader(settings: TrainerSettings, dist_env: DistEnv) -> int:
    import uvicorn

    sock = _bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    holder: dict[str, d.DistContext] = {}

    def boot() -> Booted:
        ctx, engine = build_rank(settings, dist_env)
        holder["ctx"] = ctx
        # A sharded base needs every rank in every forward, sampling's included.
        sample = partial(d.execute_samples_everywhere, ctx, engine) if settings.sharding == "fsdp" \
            else partial(d.execute_local, engine)
        return Booted(engine, partial(d.execute_everywhere, ctx, engine), sample,
                      ctx.world_size, dict(engine.info()),
                      heartbeat=partial(d.heartbeat, ctx) if ctx.distributed else None)

    def on_stop() -> None:
        ctx = holder.get("ctx")
        if ctx is not None:
            d.stop_workers(ctx)
            d.shutdown(ctx)

    limits = Limits(max_runs=settings.max_runs, max_pass_tokens=settings.max_pass_tokens,
                    max_sample_rows=settings.max_sample_rows, ttl=settings.result_ttl_seconds,
                    max_retained=settings.max_retained_results)
    options = RuntimeOptions(
        base_model=settings.base_model, boot_run=settings.boot_run(), world_size=dist_env.world_size,
        token=settings.token, max_body_bytes=settings.max_body_bytes, max_wait_seconds=settings.max_wait_seconds,
        heartbeat_seconds=settings.heartbeat_seconds, max_lora_rank=settings.max_lora_rank, limits=limits,
        pass_journal=settings.pass_journal_path())
    runtime = TrainerRuntime(options, boot, on_stop=on_stop,
                             on_boot_failure=lambda exc: d.fatal("boot failed on rank 0", error=repr(exc)))
    config = uvicorn.Config(create_app(runtime), log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=3, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    received: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises these after its graceful stop
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    log.info("listening", extra={"host": settings.host, "port": port, "url": f"http://{settings.host}:{port}",
                                 "boot_id": runtime.boot_id})
    if settings.port_file is not None:
        tmp = settings.port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(settings.port_file)
    # uvicorn's own loop choice (uvloop where installed, as `uvicorn.run` would): serving from a given socket
    # bypasses it. Every op is two requests on this loop, which shares the GIL with the op thread.
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(server.serve(sockets=[sock]))
    log.info("stopped", extra={"signals": received, "ready": runtime.ready})
    if not runtime.ready:  # stopped mid-boot: the boot thread may sit in a rendezvous or a load; never wait
        d.fatal("stopped before the group was ready; failing the group so torchrun stops every rank", code=143)
    return 0


GIL_SWITCH_SECONDS = 0.0005


def main() -> int:
    # The op thread runs Python-heavy model code; at CPython's default 5 ms switch interval the event loop
    # (answering the op's PUT, then its result) waits up to 5 ms for the GIL at each step. 0.5 ms keeps a
    # small op's round trip short at a negligible cost to the compute (measured: bench/op_overhead.py).
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    dist_env = DistEnv()
    try:
        settings = TrainerSettings()
    except ValidationError as exc:
        configure_logging("INFO", dist_env)
        log.critical("invalid settings", extra={"errors": exc.errors(include_url=False)})
        return 2
    configure_logging(settings.log_level, dist_env)
    log.info("rank started", extra={"world_size": dist_env.world_size, "local_rank": dist_env.local_rank,
                                    "node_rank": dist_env.node_rank, "base_model": settings.base_model,
                                    "model_id": settings.model_id})
    if dist_env.is_leader:
        return run_leader(settings, dist_env)
    return run_follower(settings, dist_env)


if __name__ == "__main__":
    sys.exit(main())
