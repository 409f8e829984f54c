"""The weight download recipe, unchanged and offline: the cookbook's `weights.download` and the SDK's
`tinker checkpoint download` CLI against a local gateway with real trainers on the tiny model.

Both export a training checkpoint through `create_training_client_from_state` + `save_weights_external`,
sign URLs (`external_weights_urls`), fetch them with plain urllib, and delete the export; the cookbook's
path encrypts every file to a key it makes for the download (age) and decrypts it. What arrives must be
the run's adapter exactly (the tensors of a sampler checkpoint saved at the same step) in PEFT's layout,
loadable by `PeftModel.from_pretrained` on the base model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tinker
import torch
from safetensors.torch import load_file
from tinker import types
from tinker_cookbook import weights

from tests.component.cookbook.test_cookbook_recipes import recipe_env
from tests.support.sdk import DEV_KEY, GatewayProc
from tinkerkube_contract import paths
from tinkerkube_contract.models import TINY_QWEN3

pytestmark = pytest.mark.slow


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


@pytest.fixture(scope="module")
def trained(cookbook_gateway: str) -> dict[str, str]:
    """A run trained two steps: its save_state path and the directory of a sampler checkpoint of the same
    weights (the reference the downloads are compared with)."""
    with tinker.ServiceClient(base_url=cookbook_gateway, api_key=DEV_KEY) as service:
        training = service.create_lora_training_client(base_model=TINY_QWEN3, rank=4, seed=3).result()
        for _ in range(2):
            training.forward_backward([_datum([5, 9, 2, 7, 3, 11]), _datum([4, 8, 1, 6])], "cross_entropy").result()
            training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
        state = training.save_state("trained").result().path
        reference = training.save_weights_for_sampler("reference").result().path
    return {"state": state, "reference": reference}


def _reference(gw: GatewayProc, reference: str) -> dict[str, torch.Tensor]:
    """The sampler checkpoint's tensors, read from the gateway's checkpoint store."""
    directory = paths.parse_tinker_path(reference).directory(gw.state_dir / "checkpoints")
    return load_file(directory / paths.ADAPTER_WEIGHTS_FILE)


def _assert_is_the_adapter(directory: Path, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(p.name for p in directory.iterdir()) == [paths.ADAPTER_CONFIG_FILE, paths.ADAPTER_WEIGHTS_FILE]
    got = load_file(directory / paths.ADAPTER_WEIGHTS_FILE)
    assert got.keys() == expected.keys() and len(got) > 0
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    assert any(t.abs().sum() > 0 for k, t in got.items() if "lora_B" in k)  # trained: B moved off zero
    config = json.loads((directory / paths.ADAPTER_CONFIG_FILE).read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == TINY_QWEN3


def _no_exports_left(base_url: str) -> bool:
    """Both recipes delete their temporary export after the download."""
    rest = tinker.RestClient(base_url=base_url, api_key=DEV_KEY)
    return all(c.checkpoint_type != "external" for c in rest.list_user_checkpoints().result().checkpoints)


def test_the_cookbook_downloads_a_training_checkpoint_encrypted_and_decrypts_it(
        cookbook_gateway_proc: GatewayProc, trained: dict[str, str], tiny_model_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in recipe_env(cookbook_gateway_proc.url).items():
        monkeypatch.setenv(name, value)
    out = Path(weights.download(tinker_path=trained["state"], output_dir=str(tmp_path / "adapter")))
    _assert_is_the_adapter(out, _reference(cookbook_gateway_proc, trained["reference"]))
    assert _no_exports_left(cookbook_gateway_proc.url)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    loaded = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(load_file(out / paths.ADAPTER_WEIGHTS_FILE))


def test_tinker_checkpoint_download_cli(cookbook_gateway_proc: GatewayProc, trained: dict[str, str],
                                        tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "tinker.cli", "--format", "json", "checkpoint", "download",
                           trained["state"], "--output", str(tmp_path)],
                          env=recipe_env(cookbook_gateway_proc.url), capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-5000:]}"
    target = tmp_path / trained["state"].replace("tinker://", "").replace("/", "_")
    _assert_is_the_adapter(target, _reference(cookbook_gateway_proc, trained["reference"]))
    assert json.loads(done.stdout)["destination"] == str(target)
    assert _no_exports_left(cookbook_gateway_proc.url)
