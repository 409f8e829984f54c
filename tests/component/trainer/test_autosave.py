"""Automatic checkpoints: written every N optim_steps off the op thread, pruned to the newest K, and what
a run resumes from after its pool died (weights, optimizer and the seq_id they contain)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.component.trainer.engine_fixtures import LORA, MODEL_ID, ce_datums, fb_body
from tinkerkube_contract.models import TINY_QWEN3
from tinkerkube_contract.pod_api import CONTENT_JSON, CONTENT_PROTOBUF, OpKind, RunSpec
from tinkerkube_trainer.autosave import PREFIX, latest_durable
from tinkerkube_trainer.engine import PoolEngine, build_engine
from tinkerkube_trainer.engine_api import LocalCollective, OpError, PoolConfig
from tinkerkube_trainer.multilora import peft_state_dict


def pool(root: Path, cache: Path, **config: object) -> PoolEngine:
    return build_engine(PoolConfig(base_model=TINY_QWEN3, checkpoint_dir=root, model_cache_dir=cache, device="cpu",
                                   **config), LocalCollective())  # type: ignore[arg-type]


def attach(engine: PoolEngine, **spec: object) -> None:
    out = engine.run_pass([engine.prepare_attach(RunSpec(model_id=MODEL_ID, base_model=TINY_QWEN3, lora=LORA,
                                                         **spec))])[0]  # type: ignore[arg-type]
    assert not isinstance(out, OpError), out


def train(engine: PoolEngine, first_seq: int, steps: int) -> None:
    seq = first_seq
    for i in range(steps):
        fb = engine.prepare(MODEL_ID, OpKind.FORWARD_BACKWARD, fb_body(ce_datums(3, seed=i)), CONTENT_PROTOBUF,
                            seq_id=seq)
        step = engine.prepare(MODEL_ID, OpKind.OPTIM_STEP, json.dumps({"adam_params": {"learning_rate": 0.05}})
                              .encode(), CONTENT_JSON, seq_id=seq + 1)
        assert not any(isinstance(o, OpError) for o in engine.run_pass([fb]) + engine.run_pass([step]))
        seq += 2


def test_automatic_checkpoints_are_written_pruned_and_resumed_from(tmp_path: Path, model_cache_dir: Path) -> None:
    root = tmp_path / "ckpt"
    engine = pool(root, model_cache_dir, auto_checkpoint_steps=3, auto_checkpoints_kept=2)
    attach(engine)
    train(engine, 1, 9)  # optim_steps at seq 2, 4, ..., 18: automatic checkpoints after steps 3, 6, 9
    engine.autosave.flush()
    run_dir = root / MODEL_ID
    autos = sorted(p.name for p in run_dir.glob(f"weights/{PREFIX}*"))
    assert autos == [f"{PREFIX}{12:012d}", f"{PREFIX}{18:012d}"]  # step 3's (seq 6) pruned
    assert latest_durable(root, MODEL_ID).seq_id == 18
    want = peft_state_dict(engine.runs[MODEL_ID].weights)
    moments = engine.runs[MODEL_ID].optimizer.state_dict()

    restarted = pool(root, model_cache_dir, auto_checkpoint_steps=3)  # a new pool process
    attach(restarted, resume=True)
    run = restarted.runs[MODEL_ID]
    assert run.last_completed_seq_id == 18 and run.restored_from == f"tinker://{MODEL_ID}/weights/{PREFIX}{18:012d}"
    got = peft_state_dict(run.weights)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert run.optimizer.steps == 9
    saved = run.optimizer.state_dict()["torch"]["state"]
    for i, state in moments["torch"]["state"].items():
        assert torch.equal(saved[i]["exp_avg"], state["exp_avg"])


def test_resume_without_a_durable_checkpoint_starts_from_restore_from_or_fresh(tmp_path: Path,
                                                                              model_cache_dir: Path) -> None:
    engine = pool(tmp_path / "ckpt", model_cache_dir, auto_checkpoint_steps=0)
    attach(engine, resume=True)
    fresh = pool(tmp_path / "other", model_cache_dir)
    attach(fresh)
    a, b = peft_state_dict(engine.runs[MODEL_ID].weights), peft_state_dict(fresh.runs[MODEL_ID].weights)
    assert all(torch.equal(a[k], b[k]) for k in a)  # nothing to resume: the seeded start, as a new run
    assert engine.runs[MODEL_ID].last_completed_seq_id == 0
    train(engine, 1, 2)
    assert latest_durable(tmp_path / "ckpt", MODEL_ID) is None  # automatic checkpoints off
