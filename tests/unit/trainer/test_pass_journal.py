"""The pass journal (pass_journal.py): what a dead process leaves, what its successor makes of it, and
how a journaled runner splits suspects out of a pass and refuses a twice-crashing op."""

from __future__ import annotations

import json
from pathlib import Path

from tinkerkube_contract.pod_api import ErrorCategory, OpKind
from tinkerkube_trainer.engine_api import OpError, OpOutput, PoolOpKind, PreparedOp
from tinkerkube_trainer.pass_journal import CODE, PassJournal, journal_key, journaled

FB = OpKind.FORWARD_BACKWARD


def op(model_id: str, seq_id: int) -> PreparedOp:
    return PreparedOp(FB, None, model_id, seq_id)


def die_in(path: Path, *ops: PreparedOp) -> None:
    """What a process killed mid-pass leaves: its journal naming the pass's ops."""
    journal = PassJournal(path)
    journal.begin([journal_key(o) for o in ops])  # type: ignore[misc]


class Recorder:
    def __init__(self) -> None:
        self.passes: list[list[tuple[str | None, int | None]]] = []

    def __call__(self, ops: list[PreparedOp]) -> list[OpOutput | OpError]:
        self.passes.append([(o.model_id, o.seq_id) for o in ops])
        return [OpOutput("application/json", f"{o.model_id}#{o.seq_id}".encode()) for o in ops]


def test_a_clean_journal_has_no_suspects_and_a_pass_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "j" / "pool.json"
    journal = PassJournal(path)
    journal.begin([("a", 1), ("b", 4)])
    assert json.loads(path.read_text())["running"] == [["a", 1], ["b", 4]]
    journal.end([("a", 1), ("b", 4)])
    assert PassJournal(path).suspects == {}
    assert [p.name for p in path.parent.iterdir()] == ["pool.json"]  # written in place: no temporary files


def test_a_shorter_journal_overwrites_a_longer_one_whole(tmp_path: Path) -> None:
    """Written in place, a short document must not leave the tail of a longer one behind it, and the
    padding must not grow the file without bound."""
    path = tmp_path / "pool.json"
    journal = PassJournal(path)
    many = [(f"run-{i}", i) for i in range(400)]
    journal.begin(many)
    assert len(json.loads(path.read_text())["running"]) == 400
    journal.begin([("a", 1)])
    assert json.loads(path.read_text())["running"] == [["a", 1]]  # the longer tail was padded over
    journal.end([("a", 1)])
    assert json.loads(path.read_text()) == {"suspects": [], "running": []}
    assert path.stat().st_size < 4096 + 100  # the padding was cut once it passed SHRINK_AT
    journal.close()


def test_the_ops_of_the_pass_a_process_died_in_are_suspects_counted_per_death(tmp_path: Path) -> None:
    path = tmp_path / "pool.json"
    die_in(path, op("a", 1), op("b", 4))
    assert PassJournal(path).suspects == {("a", 1): 1, ("b", 4): 1}
    # booting again without having run them keeps the counts; dying again with a alone adds one
    journal = PassJournal(path)
    journal.begin([("a", 1)])
    assert PassJournal(path).suspects == {("a", 1): 2, ("b", 4): 1}


def test_a_torn_or_foreign_journal_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "pool.json"
    for garbage in (b'{"suspects": [["a", 1, 1]], "runn', b"[1, 2]", b'{"suspects": [["a"]], "running": []}',
                    b"\x00\xff\xfe"):
        path.write_bytes(garbage)
        assert PassJournal(path).suspects == {}
        assert json.loads(path.read_text()) == {"suspects": [], "running": []}  # rewritten clean


def test_suspects_run_alone_after_the_innocent_ops_of_their_pass(tmp_path: Path) -> None:
    path = tmp_path / "pool.json"
    die_in(path, op("a", 1), op("b", 4))
    runner = Recorder()
    journal = PassJournal(path)
    run = journaled(runner, journal)
    out = run([op("c", 7), op("a", 1), op("d", 2), op("b", 4)])
    assert runner.passes == [[("c", 7), ("d", 2)], [("a", 1)], [("b", 4)]]
    assert [o.body for o in out if isinstance(o, OpOutput)] == [b"c#7", b"a#1", b"d#2", b"b#4"]  # in order
    assert journal.suspects == {}  # they ran: no longer suspects
    assert PassJournal(path).suspects == {}


def test_a_suspect_that_killed_the_process_twice_fails_without_running(tmp_path: Path) -> None:
    path = tmp_path / "pool.json"
    die_in(path, op("a", 1), op("b", 4))
    die_in(path, op("a", 1))  # run alone after the first death, died again
    refused: list[int] = []
    runner = Recorder()
    run = journaled(runner, PassJournal(path), lambda: refused.append(1))
    out = run([op("a", 1), op("b", 4)])
    assert runner.passes == [[("b", 4)]]
    assert isinstance(out[0], OpError) and out[0].code == CODE and out[0].category is ErrorCategory.USER
    assert "died twice" in out[0].message and isinstance(out[1], OpOutput)
    assert refused == [1]
    assert PassJournal(path).suspects == {}
    nxt = journaled(runner, PassJournal(path))([op("a", 2)])  # the run's next op is an ordinary op again
    assert runner.passes[-1] == [("a", 2)] and isinstance(nxt[0], OpOutput) and nxt[0].body == b"a#2"


def test_ops_without_a_seq_are_not_journaled(tmp_path: Path) -> None:
    path = tmp_path / "pool.json"
    run = journaled(Recorder(), PassJournal(path))
    before = path.stat().st_mtime_ns
    run([PreparedOp(OpKind.FORWARD_BACKWARD, None, "a", None), PreparedOp(PoolOpKind.DETACH, None, "a")])
    assert path.stat().st_mtime_ns == before


def attach(model_id: str) -> PreparedOp:
    return PreparedOp(PoolOpKind.ATTACH, None, model_id)


def test_an_attach_is_journaled_and_one_that_killed_the_process_twice_is_refused(tmp_path: Path) -> None:
    """Restoring a run's checkpoint can be what kills the process; after every restart the run would be
    attached again. Twice dead in its attach: that run fails to attach, the pool's other runs attach."""
    path = tmp_path / "pool.json"
    runner = Recorder()
    ok = journaled(runner, PassJournal(path))([attach("a")])  # an attach that returns clears its entry
    assert isinstance(ok[0], OpOutput) and PassJournal(path).suspects == {}
    die_in(path, attach("a"))  # died while attaching "a"
    journal = PassJournal(path)
    assert journal.count(attach("a")) == 1 and journal.count(attach("b")) == 0
    die_in(path, attach("a"))  # the second death
    refused: list[int] = []
    run = journaled(runner, PassJournal(path), lambda: refused.append(1))
    out = run([attach("a")]) + run([attach("b")])
    assert isinstance(out[0], OpError) and out[0].code == CODE and out[0].category is ErrorCategory.USER
    assert "attaching this run" in out[0].message and isinstance(out[1], OpOutput)
    assert runner.passes[-1] == [("b", None)] and refused == [1]
    assert PassJournal(path).suspects == {}


def test_where_the_journal_lives(tmp_path: Path) -> None:
    """Beside the durable state: named by the launcher (a local pool, kept across its restarts), or by the
    run a session's own pod set serves; off for a shared pool that names none."""
    from tinkerkube_trainer.settings import TrainerSettings

    def path(**kw: object) -> Path | None:
        return TrainerSettings(base_model="tiny", checkpoint_dir=tmp_path, **kw).pass_journal_path()  # type: ignore[arg-type]

    assert path(pass_journal=tmp_path / "p.json") == tmp_path / "p.json"
    one, other = path(model_id="run-a"), path(model_id="run-b")
    assert one is not None and one.parent == tmp_path / ".pass-journal" and one != other
    assert path() is None
