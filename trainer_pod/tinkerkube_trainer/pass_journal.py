"""Poison ops: an op that crashes the trainer process fails alone instead of failing its whole pool.

Why: after a pool process dies, its runs are attached again from their automatic checkpoints and the
gateway replays the ops after them. An op that itself kills the process (an allocation that gets it
OOM-killed, a native crash) would be replayed after every restart and crash it again, until the
restart budget fails every run of the pool. So rank 0 keeps a small durable journal: before a
training pass runs it writes the (model_id, seq_id) of the pass's ops, and clears them once the pass
returns (success or op errors alike). A journal that still names ops at boot was left by a process
that died in that pass: those ops are suspects, each with a count of the passes it was in when the
process died. A suspect submitted again (the gateway replays it under the same model_id and seq_id)
runs in a pass of its own, so innocent ops batched with it are not blamed; a suspect whose count
reached `REFUSE_AT` (it was in the pass each time, the last time alone) is not run again: it fails
with `CODE`, its seq is consumed, and the run goes on with its next ops.

A run's attach (restoring its adapter and optimizer from a checkpoint, which can be what exhausts the
process's memory) is journaled too, under the seq `ATTACH_SEQ`: every attach is a pass of its own, so
an attach the process died in twice is refused with `CODE` and that run fails to attach, while the
pool's other runs attach again and go on (before, it was attached again after every restart until the
restart budget failed the whole pool).

The journal lives beside the pool's durable state (under the checkpoint store, which survives a
process restart in local mode and in a pod). It is written twice per training pass, so a write is one
`pwrite` at offset 0 of a file held open, padded with spaces to the file's length (JSON ignores them):
a temporary file + rename + mkdir cost 0.5-1.3 ms of a pass here, on the path of every small op. Not
fsynced: a dead process leaves its writes in the page cache; only a whole machine crash loses them,
and then the op is merely retried once more. A process killed inside the write itself may leave a torn
file; like a foreign one it is ignored (no suspects), which only loses the protection once.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from tinkerkube_contract.pod_api import ErrorCategory
from tinkerkube_trainer.engine_api import OpError, OpOutput, PoolOpKind, PreparedOp

log = logging.getLogger(__name__)

Key = tuple[str, int]
PassRunner = Callable[[list[PreparedOp]], list["OpOutput | OpError"]]
REFUSE_AT = 2  # deaths with the op in the pass, the last one alone
MAX_SUSPECTS = 1024  # suspects of runs that never came back are forgotten beyond this, oldest first
SHRINK_AT = 4096  # padding beyond this many bytes is cut off (after the write that made it padding)
CODE = "op_crashed_trainer"
MESSAGE = (f"{CODE}: this op was running when the trainer process died twice (the second time alone); "
           "it was not run again. Its input is the likely cause (e.g. too large for this pool's memory); "
           "the run goes on with its next ops")
ATTACH_SEQ = -1  # a run's attach in the journal (the op path refuses seq_ids < 0: no op has it)
ATTACH_MESSAGE = (f"{CODE}: attaching this run (restoring its checkpoint) was under way when the trainer process "
                  "died twice, the second time alone; it was not tried again and the run cannot go on in this pool. "
                  "Its checkpoint is the likely cause (e.g. too large for this pool's memory)")


def journal_key(op: PreparedOp) -> Key | None:
    """What names `op` in the journal; None: it is not journaled."""
    if op.kind is PoolOpKind.ATTACH and op.model_id is not None:
        return op.model_id, ATTACH_SEQ
    return (op.model_id, op.seq_id) if op.model_id is not None and op.seq_id is not None else None


def _parse(text: str) -> tuple[dict[Key, int], list[Key]]:
    """(suspects with their counts, ops of the pass that was running); raises on anything malformed."""
    doc = json.loads(text)
    suspects = {(str(m), int(s)): int(c) for m, s, c in doc["suspects"]}
    running = [(str(m), int(s)) for m, s in doc["running"]]
    return suspects, running


class PassJournal:
    """Rank 0's journal. Built at boot: it reads what a dead predecessor left."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            suspects, running = _parse(path.read_text())
        except FileNotFoundError:
            suspects, running = {}, []
        except (OSError, ValueError, TypeError, KeyError) as exc:  # torn or foreign: start clean
            log.warning("pass journal unreadable; ignored", extra={"path": str(path), "error": repr(exc)})
            suspects, running = {}, []
        for key in running:
            suspects[key] = suspects.get(key, 0) + 1
        self.suspects = dict(list(suspects.items())[-MAX_SUSPECTS:])
        if running:
            log.warning("the previous trainer process died in a pass",
                        extra={"suspects": [f"{m}#{s}" for m, s in running]})
        self._fd: int | None = None
        self._size = 0  # the file's length: every write covers it all
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            self._size = os.fstat(self._fd).st_size
        except OSError:  # an unwritable store must not take the pool down; it only loses the protection
            log.exception("pass journal cannot be opened; poison-op protection is off", extra={"path": str(path)})
        self._write([])

    def count(self, op: PreparedOp) -> int:
        key = journal_key(op)
        return self.suspects.get(key, 0) if key is not None else 0

    def begin(self, keys: list[Key]) -> None:
        self._write(keys)

    def end(self, keys: list[Key]) -> None:
        """The pass returned: its ops are cleared (a suspect that ran is no longer one)."""
        for key in keys:
            self.suspects.pop(key, None)
        self._write([])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write(self, running: list[Key]) -> None:
        if self._fd is None:
            return
        doc = {"suspects": [[m, s, c] for (m, s), c in self.suspects.items()], "running": [list(k) for k in running]}
        data = json.dumps(doc).encode()
        try:
            os.pwrite(self._fd, data.ljust(self._size, b" "), 0)
            self._size = max(self._size, len(data))
            if self._size - len(data) > SHRINK_AT:  # the padded file was whole at every moment; so is the cut one
                os.ftruncate(self._fd, len(data))
                self._size = len(data)
        except OSError:  # a full disk must not take the pool down; it only loses the protection
            log.exception("pass journal write failed", extra={"path": str(self.path)})


def journaled(runner: PassRunner, journal: PassJournal, on_refused: Callable[[], None] | None = None) -> PassRunner:
    """`runner` with the journal around it: suspects run alone (after the pass's other ops), and a
    suspect at `REFUSE_AT` fails with `CODE` without running.

    Category USER: the op's own input is what killed the process twice (nothing else was in the pass
    the second time), so retrying it as is cannot help; the user must change it."""

    def run(ops: list[PreparedOp]) -> list[OpOutput | OpError]:
        suspects = [i for i, op in enumerate(ops) if journal.count(op)]
        groups = [[i for i in range(len(ops)) if i not in suspects], *([i] for i in suspects)]
        outcomes: dict[int, OpOutput | OpError] = {}
        for group in groups:
            if not group:
                continue
            keys = [k for k in (journal_key(ops[i]) for i in group) if k is not None]
            if len(group) == 1 and journal.count(ops[group[0]]) >= REFUSE_AT:
                log.error("op refused: it crashed the trainer", extra={"model_id": keys[0][0], "seq_id": keys[0][1]})
                message = ATTACH_MESSAGE if ops[group[0]].kind is PoolOpKind.ATTACH else MESSAGE
                outcomes[group[0]] = OpError(message, code=CODE, category=ErrorCategory.USER)
                journal.end(keys)
                if on_refused is not None:
                    on_refused()
                continue
            if keys:
                journal.begin(keys)
            try:
                results = runner([ops[i] for i in group])
            finally:
                if keys:
                    journal.end(keys)
            outcomes.update(zip(group, results, strict=True))
        return [outcomes[i] for i in range(len(ops))]

    return run
