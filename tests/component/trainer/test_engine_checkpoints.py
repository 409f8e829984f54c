"""Save/load and restore: identical logprobs and optimizer state, plain-peft export, crash recovery."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.component.trainer.engine_fixtures import (
    MODEL_ID,
    ThreadCollective,
    ThreadGroup,
    assert_same_tensors,
    ce_datums,
    engine_config,
    new_engine,
    optim_step,
    prepare_json,
    run_fb,
    run_json,
)
from tinkerkube_contract.paths import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, METADATA_FILE, parse_tinker_path
from tinkerkube_contract.pod_api import OpKind
from tinkerkube_contract.resource import LoraSpec
from tinkerkube_trainer.engine_api import OpError

EVAL = ce_datums(3, seed=42)


def _train_and_save(root: Path, cache_dir: Path):
    """An engine two optimizer steps in, with a save_state at seq 9 and sampler weights at seq 10."""
    engine = new_engine(engine_config(root, cache_dir))
    for seed in (1, 2):
        run_fb(engine, ce_datums(4, seed=seed))
        optim_step(engine, lr=0.05)
    run_json(engine, OpKind.SAVE_STATE, {"name": "step2"}, seq_id=9)
    run_json(engine, OpKind.SAVE_SAMPLER_WEIGHTS, {"name": "s2"}, seq_id=10)
    return engine


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path, tiny_model_dir: Path):
    """Shared by tests that only read it (and its checkpoints); tests that train build their own."""
    return _train_and_save(tmp_path_factory.mktemp("saved"), model_cache_dir)


@pytest.fixture
def trained(tmp_path: Path, model_cache_dir: Path, tiny_model_dir: Path):
    return _train_and_save(tmp_path, model_cache_dir)


def _logprobs(engine) -> list[np.ndarray]:
    return [np.asarray(o["logprobs"].data) for o in run_fb(engine, EVAL, forward_only=True).loss_fn_outputs]


def _same_logprobs(a, b) -> None:
    for x, y in zip(_logprobs(a), _logprobs(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_save_state_writes_peft_files_metadata_and_reports_the_path(saved) -> None:
    result = run_json(saved, OpKind.SAVE_STATE, {"name": "again"}, seq_id=11)["checkpoint"]
    assert result["tinker_path"] == f"tinker://{MODEL_ID}/weights/again" and result["kind"] == "weights"
    directory = parse_tinker_path(result["tinker_path"]).directory(saved.config.checkpoint_dir)
    assert {ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, METADATA_FILE, "optimizer.pt"} <= {
        p.name for p in directory.iterdir()}
    assert result["size_bytes"] == sum(p.stat().st_size for p in directory.iterdir())
    meta = json.loads((directory / METADATA_FILE).read_text())
    assert (meta["seq_id"], meta["base_model"], meta["model_id"]) == (11, saved.config.run.base_model, MODEL_ID)
    assert LoraSpec.model_validate(meta["lora"]) == saved.config.run.lora
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_load_with_optimizer_reproduces_logprobs_and_optimizer_state(trained, tmp_path, model_cache_dir) -> None:
    fresh = new_engine(engine_config(tmp_path, model_cache_dir))
    run_json(fresh, OpKind.LOAD_STATE, {"path": f"tinker://{MODEL_ID}/weights/step2", "with_optimizer": True})
    _same_logprobs(fresh, trained)
    ours, theirs = fresh.optimizer.state_dict(), trained.optimizer.state_dict()
    assert ours["steps"] == theirs["steps"] == 2
    for a, b in zip(ours["torch"]["state"].values(), theirs["torch"]["state"].values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    for engine in (fresh, trained):  # the next step is the same too
        run_fb(engine, ce_datums(4, seed=3))
        optim_step(engine, lr=0.05)
    assert_same_tensors(fresh.adapter_weights(), trained.adapter_weights(), rtol=0, atol=0)


def test_load_without_optimizer_keeps_weights_and_resets_optimizer(trained) -> None:
    expected = _logprobs(trained)
    run_fb(trained, ce_datums(4, seed=7))
    optim_step(trained, lr=0.5)  # move away, then come back
    run_json(trained, OpKind.LOAD_STATE, {"path": f"tinker://{MODEL_ID}/weights/step2"})
    for x, y in zip(_logprobs(trained), expected, strict=True):
        np.testing.assert_array_equal(x, y)
    assert trained.optimizer.state_dict()["steps"] == 0 and not trained.optimizer.torch_opt.state


def test_sampler_weights_load_in_plain_peft_and_reproduce_logprobs(saved, tiny_model_dir) -> None:
    directory = parse_tinker_path(f"tinker://{MODEL_ID}/sampler_weights/s2").directory(saved.config.checkpoint_dir)
    assert not (directory / "optimizer.pt").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(directory)).eval()
    for datum, want in zip(EVAL, _logprobs(saved), strict=True):
        ids = torch.tensor([datum.model_input.to_ints()])
        targets = torch.tensor(datum.loss_fn_inputs["target_tokens"].data)
        with torch.no_grad():
            got = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)[torch.arange(len(targets)), targets]
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_restore_at_build_is_crash_recovery_for_the_same_model(saved, model_cache_dir) -> None:
    root = saved.config.checkpoint_dir.parent
    path = f"tinker://{MODEL_ID}/weights/step2"
    same = new_engine(engine_config(root, model_cache_dir, restore_from=path, restore_optimizer=True,
                                    lora=LoraSpec(rank=8)))  # the checkpoint's spec wins
    assert same.info()["last_completed_seq_id"] == 9 and same.info()["restored_from"] == path
    assert same.run.spec.lora == saved.run.spec.lora and same.optimizer.steps == 2
    _same_logprobs(same, saved)
    other = new_engine(engine_config(root, model_cache_dir, model_id="sess-x:train:3", restore_from=path))
    assert other.info()["last_completed_seq_id"] == 0 and other.optimizer.steps == 0
    _same_logprobs(other, saved)


def test_sample_mode_restored_from_sampler_weights(saved, model_cache_dir) -> None:
    root = saved.config.checkpoint_dir.parent
    path = f"tinker://{MODEL_ID}/sampler_weights/s2"
    sampler = new_engine(engine_config(root, model_cache_dir, model_id="sess-x:sample:0", mode="sample",
                                       restore_from=path))
    assert sampler.optimizer is None
    with pytest.raises(OpError) as err:
        prepare_json(sampler, OpKind.OPTIM_STEP, {})
    assert err.value.category == "user"


@pytest.mark.parametrize(("payload", "code"), [
    ({"path": f"tinker://{MODEL_ID}/weights/missing"}, "checkpoint_not_found"),
    ({"path": f"tinker://{MODEL_ID}/sampler_weights/s2", "with_optimizer": True}, "no_optimizer_state"),
    ({"path": f"tinker://{MODEL_ID}/weights/..%2f"}, "invalid_path"),
    ({"path": "tinker://../weights/x"}, "invalid_path"),
    ({"path": "s3://bucket/x"}, "invalid_path"),
    ({"path": f"tinker://{MODEL_ID}/external_weights/x"}, "invalid_path"),
])
def test_bad_loads_are_user_errors_and_change_nothing(saved, payload, code) -> None:
    before = saved.adapter_weights()
    with pytest.raises(OpError) as err:
        prepare_json(saved, OpKind.LOAD_STATE, payload)
    assert (err.value.code, err.value.category) == (code, "user")
    assert_same_tensors(saved.adapter_weights(), before, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "", "x" * 200])
def test_bad_checkpoint_names_are_refused(saved, name) -> None:
    with pytest.raises(OpError) as err:
        prepare_json(saved, OpKind.SAVE_STATE, {"name": name})
    assert err.value.code == "invalid_path"


def _on_ranks(calls) -> list:
    """Run one callable per rank concurrently; each result is its value or the exception it raised."""
    def guarded(call):
        try:
            return call()
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(guarded, calls))


def test_ranks_that_cannot_see_the_store_get_checkpoints_from_rank_0(saved, tmp_path, model_cache_dir) -> None:
    store = saved.config.checkpoint_dir.parent
    path = f"tinker://{MODEL_ID}/weights/step2"
    group = ThreadGroup(2)
    configs = [engine_config(store, model_cache_dir, restore_from=path, restore_optimizer=True),
               engine_config(tmp_path, model_cache_dir, restore_from=path, restore_optimizer=True)]  # empty store
    ranks = _on_ranks([lambda r=r: new_engine(configs[r], ThreadCollective(group, r)) for r in range(2)])
    for engine in ranks:
        assert_same_tensors(engine.adapter_weights(), saved.adapter_weights(), rtol=0, atol=0)
        assert engine.optimizer.steps == 2 and engine.info()["last_completed_seq_id"] == 9
    load = prepare_json(ranks[0], OpKind.LOAD_STATE, {"path": f"tinker://{MODEL_ID}/sampler_weights/s2"})
    outcomes = _on_ranks([lambda e=e: e.execute(load) for e in ranks])
    assert not [o for o in outcomes if isinstance(o, Exception)]
    assert_same_tensors(ranks[1].adapter_weights(), ranks[0].adapter_weights(), rtol=0, atol=0)


def test_a_checkpoint_vanishing_before_load_fails_every_rank_alike(trained, tmp_path, model_cache_dir) -> None:
    group = ThreadGroup(2)
    ranks = [new_engine(engine_config(tmp_path, model_cache_dir), ThreadCollective(group, r)) for r in range(2)]
    load = prepare_json(ranks[0], OpKind.LOAD_STATE, {"path": f"tinker://{MODEL_ID}/weights/step2"})
    shutil.rmtree(parse_tinker_path(f"tinker://{MODEL_ID}/weights/step2").directory(trained.config.checkpoint_dir))
    before = ranks[1].adapter_weights()
    outcomes = _on_ranks([lambda e=e: e.execute(load) for e in ranks])
    assert all(isinstance(o, OpError) and o.code == outcomes[0].code for o in outcomes)
    assert_same_tensors(ranks[1].adapter_weights(), before, rtol=0, atol=0)
