"""How a running sampling pass gets its requests, including those that arrive while it decodes
(continuous batching), and hands each result back to the event loop as soon as it is ready."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from tinkerkube_contract.pod_api import ErrorCategory, OpFailure
from tinkerkube_trainer.engine_api import OpError, OpOutput, PreparedOp
from tinkerkube_trainer.run_queue import Entry
from tinkerkube_trainer.sample_progress import Progress

log = logging.getLogger(__name__)

CANCELLED = "the sample was cancelled (DELETE on its sample path) before it finished"


class SampleFeed:
    """Hands a running sampling pass its samples, including those that arrive while it decodes, and
    their outcomes back to the event loop one by one. Offered on the event loop, polled and answered
    on the op thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_done: Callable[[Entry, OpOutput | OpFailure], None],
                 max_rows: int, on_step: Callable[[], None] | None = None,
                 watched: Callable[[], bool] = lambda: False) -> None:
        self._loop, self._on_done, self._max_rows = loop, on_done, max_rows
        self._on_step, self._watched = on_step, watched
        self._lock = threading.Lock()
        self._queue: list[Entry] = []
        self._active: dict[int, tuple[Entry, int]] = {}  # id(entry) → (entry, rows)
        self._rows = 0
        self._closed = False
        self.served = 0

    def offer(self, entry: Entry) -> bool:
        rows = sample_rows(entry)
        with self._lock:
            if self._closed or (self._rows and self._rows + rows > self._max_rows):
                return False
            self._rows += rows
            self._queue.append(entry)
            return True

    def poll(self) -> list[tuple[Any, PreparedOp]]:
        with self._lock:
            taken, self._queue = self._queue, []
            for entry in taken:
                self._active[id(entry)] = (entry, sample_rows(entry))
        self.served += len(taken)
        return [(entry, entry.prepared) for entry in taken if entry.prepared is not None]

    def progress(self, key: Any) -> Progress | None:
        return key.progress if isinstance(key, Entry) else None

    def stepped(self) -> None:
        """Wake streaming readers on the event loop, only when some are waiting (a step is milliseconds)."""
        if self._on_step is not None and self._watched():
            self._loop.call_soon_threadsafe(self._on_step)

    def done(self, key: Any, outcome: OpOutput | OpError | OpFailure) -> None:
        if isinstance(outcome, OpError):
            outcome = OpFailure(error=outcome.message, category=outcome.category)
        if isinstance(key, Entry) and key.progress is not None and key.progress.stop_now:
            outcome = OpFailure(error=CANCELLED, category=ErrorCategory.USER)
        with self._lock:
            entry, rows = self._active.pop(id(key))
            self._rows -= rows
        self._loop.call_soon_threadsafe(self._on_done, entry, outcome)

    def fail_active(self, failure: OpFailure) -> None:
        with self._lock:
            active = [entry for entry, _ in self._active.values()]
        for entry in active:
            self.done(entry, failure)

    def close(self) -> list[Entry]:
        """No more joiners; returns what was offered but never taken (to wait for the next pass)."""
        with self._lock:
            self._closed = True
            left, self._queue = self._queue, []
            return left


def sample_rows(entry: Entry) -> int:
    payload = entry.prepared.payload if entry.prepared is not None else None
    params = getattr(payload, "params", None)
    return int(getattr(params, "num_samples", 1) or 1)


class ListFeed:
    """A sampling pass over a fixed list of ops (no joiners), outcomes in op order."""

    def __init__(self, ops: Sequence[PreparedOp]) -> None:
        self._ops: list[tuple[Any, PreparedOp]] = list(enumerate(ops))
        self.outcomes: list[OpOutput | OpError | None] = [None] * len(ops)

    def poll(self) -> list[tuple[Any, PreparedOp]]:
        taken, self._ops = self._ops, []
        return taken

    def done(self, key: Any, outcome: OpOutput | OpError) -> None:
        self.outcomes[key] = outcome

    def progress(self, key: Any) -> None:
        return None

    def stepped(self) -> None:
        return None


def run_sampling_pass(runner: Callable[[SampleFeed], None], feed: SampleFeed) -> None:
    """Runs on the executor thread: a sampling pass; if it breaks, every sample it holds fails as a server
    failure (the ones still queued wait for the next pass)."""
    try:
        runner(feed)
    except Exception as exc:
        log.exception("sampling pass failed")
        feed.fail_active(OpFailure(error=f"internal error: {type(exc).__name__}: {exc}",
                                   category=ErrorCategory.SERVER))
