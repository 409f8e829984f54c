"""External weights on disk (trainer export.py): PEFT's two files, age-encrypted to the given recipients."""

from __future__ import annotations

import json
from pathlib import Path

import pyrage
import pytest
import torch
from safetensors.torch import load

from tinkerkube_contract.pod_api import OpTiming, SaveExternalWeightsOp
from tinkerkube_trainer import export
from tinkerkube_trainer.engine_api import OpError

SSH_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGRwh+ESAjdLMyuEThd7E1aSU2j2Y7IZt7vwjCqKbOQ9 user@host")
ADAPTER = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}


def test_an_export_is_the_adapter_in_pefts_layout(tmp_path: Path) -> None:
    files = export.external_files(ADAPTER, {"r": 2, "target_modules": {"q_proj"}})
    size = export.write_external(tmp_path / "final", files, [])
    written = {p.name: p.read_bytes() for p in (tmp_path / "final").iterdir()}
    assert set(written) == {"adapter_model.safetensors", "adapter_config.json"}
    assert size == sum(len(b) for b in written.values())
    assert torch.equal(load(written["adapter_model.safetensors"])[next(iter(ADAPTER))], next(iter(ADAPTER.values())))
    assert json.loads(written["adapter_config.json"]) == {"r": 2, "target_modules": ["q_proj"]}
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no temporary left beside it


def test_an_encrypted_export_decrypts_with_either_recipient_and_replaces_the_old_one(tmp_path: Path) -> None:
    one, two = pyrage.x25519.Identity.generate(), pyrage.x25519.Identity.generate()
    files = export.external_files(ADAPTER, {"r": 2})
    export.write_external(tmp_path / "final", {"old.txt": b"old"}, [])
    recipients = export.parse_recipients([str(one.to_public()), str(two.to_public()), SSH_KEY])
    export.write_external(tmp_path / "final", files, recipients)
    names = sorted(p.name for p in (tmp_path / "final").iterdir())
    assert names == ["adapter_config.json.age", "adapter_model.safetensors.age"]
    sealed = (tmp_path / "final" / "adapter_config.json.age").read_bytes()
    assert b'"r"' not in sealed
    assert pyrage.decrypt(sealed, [two]) == files["adapter_config.json"]
    with pytest.raises(pyrage.DecryptError):
        pyrage.decrypt(sealed, [pyrage.x25519.Identity.generate()])


@pytest.mark.parametrize("bad", ["", "age1notakey", "ssh-ed25519 AAAA", "x" * 20_000, "-----BEGIN"])
def test_a_bad_recipient_is_the_users_error(bad: str) -> None:
    with pytest.raises(OpError) as refused:
        export.parse_recipients([bad])
    assert refused.value.code == "invalid_recipient" and refused.value.category.value == "user"


def test_decode_checks_name_and_recipients_before_anything_runs() -> None:
    payload = export.decode("s:train:0", SaveExternalWeightsOp(name="final", age_recipients=[SSH_KEY]))
    assert str(payload.path) == "tinker://s:train:0/external_weights/final" and payload.age_recipients == (SSH_KEY,)
    with pytest.raises(OpError, match="invalid checkpoint name"):
        export.decode("s:train:0", SaveExternalWeightsOp(name="../x"))
    with pytest.raises(OpError, match="at most 10"):
        export.parse_recipients([SSH_KEY] * 11)


def test_op_timing_round_trips_and_ignores_garbage() -> None:
    timing = OpTiming(wait_s=0.25, run_s=1.5)
    assert OpTiming.parse(timing.header()) == timing
    for garbage in (None, "", "wait=1", "wait=x;run=1", "wait=-1;run=1", "wait=nan;run=1", "nonsense"):
        assert OpTiming.parse(garbage) is None, garbage


def test_save_writes_on_rank_0_and_a_store_that_cannot_be_written_is_a_clear_server_error(tmp_path: Path) -> None:
    from tinkerkube_trainer.engine_api import LocalCollective

    payload = export.decode("s:train:0", SaveExternalWeightsOp(name="final"))
    written = export.save(LocalCollective(), payload, lambda: (ADAPTER, {"r": 2}), tmp_path / "store")
    assert written.kind == "external_weights" and written.tinker_path == "tinker://s:train:0/external_weights/final"
    assert written.size_bytes == sum(p.stat().st_size for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert export.save(LocalCollective(), payload, lambda: None, tmp_path / "store").size_bytes == 0
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("x")
    with pytest.raises(OpError) as failed:
        export.save(LocalCollective(), payload, lambda: (ADAPTER, {"r": 2}), blocked)
    assert failed.value.code == "checkpoint_write_failed" and failed.value.category.value == "server"
    assert "could not write tinker://s:train:0/external_weights/final" in failed.value.message
