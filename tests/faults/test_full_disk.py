"""A full checkpoint store (a tiny tmpfs): saving fails clearly on every rank alike, nothing changes, and
the run trains on exactly like its twin; a failing automatic checkpoint never stops training."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.component.trainer.engine_fixtures import LORA, MODEL_ID, ce_datums, fb_body
from tinkerkube_contract.models import TINY_QWEN3
from tinkerkube_contract.pod_api import CONTENT_JSON, CONTENT_PROTOBUF, OpKind, RunSpec
from tinkerkube_trainer import checkpoints
from tinkerkube_trainer.engine import PoolEngine, build_engine
from tinkerkube_trainer.engine_api import LocalCollective, OpError, OpOutput, PoolConfig
from tinkerkube_trainer.multilora import peft_state_dict


@pytest.fixture
def full_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 256 KiB tmpfs (a real full disk) where the machine lets us mount one; otherwise a store whose
    writes fail with ENOSPC."""
    store = tmp_path / "store"
    store.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(store)],
                                                   capture_output=True).returncode == 0
    if not mounted:
        def no_space(*_: object, **__: object) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(checkpoints, "write_checkpoint", no_space)
    try:
        yield store
    finally:
        if mounted:  # lazily: a writer thread of the engine may still hold the directory
            subprocess.run(["umount", "-l", str(store)], check=False)


def engine(store: Path, cache: Path) -> PoolEngine:
    eng = build_engine(PoolConfig(base_model=TINY_QWEN3, checkpoint_dir=store, model_cache_dir=cache, device="cpu",
                                  auto_checkpoint_steps=1), LocalCollective())
    out = eng.run_pass([eng.prepare_attach(RunSpec(model_id=MODEL_ID, base_model=TINY_QWEN3, lora=LORA))])[0]
    assert isinstance(out, OpOutput), out
    return eng


def run(eng: PoolEngine, kind: OpKind, body: bytes, seq: int) -> OpOutput | OpError:
    ctype = CONTENT_PROTOBUF if kind is OpKind.FORWARD_BACKWARD else CONTENT_JSON
    return eng.run_pass([eng.prepare(MODEL_ID, kind, body, ctype, seq_id=seq)])[0]


def step(eng: PoolEngine, i: int, seq: int) -> None:
    assert isinstance(run(eng, OpKind.FORWARD_BACKWARD, fb_body(ce_datums(3, seed=i)), seq), OpOutput)
    step_body = json.dumps({"adam_params": {"learning_rate": 0.05}}).encode()
    assert isinstance(run(eng, OpKind.OPTIM_STEP, step_body, seq + 1), OpOutput)  # its autosave fails, quietly


def test_a_full_store_fails_the_save_clearly_and_the_run_goes_on_like_its_twin(
        full_store: Path, tmp_path: Path, model_cache_dir: Path) -> None:
    victim, twin = engine(full_store, model_cache_dir), engine(tmp_path / "roomy", model_cache_dir)
    for eng in (victim, twin):
        step(eng, 0, 1)
    victim.autosave.flush()
    before = peft_state_dict(victim.runs[MODEL_ID].weights)
    failed = run(victim, OpKind.SAVE_STATE, json.dumps({"name": "big"}).encode(), 3)
    assert isinstance(failed, OpError) and failed.code == "checkpoint_write_failed" and failed.category == "server"
    assert "full" in failed.message
    assert not [p for p in full_store.rglob("*") if p.is_dir() and p.name.startswith(".")]  # no temp dir left
    after = peft_state_dict(victim.runs[MODEL_ID].weights)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(run(twin, OpKind.SAVE_STATE, json.dumps({"name": "big"}).encode(), 3), OpOutput)
    for eng in (victim, twin):
        step(eng, 1, 4)
    a, b = peft_state_dict(victim.runs[MODEL_ID].weights), peft_state_dict(twin.runs[MODEL_ID].weights)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with contextlib.suppress(Exception):
        victim.autosave.flush()
