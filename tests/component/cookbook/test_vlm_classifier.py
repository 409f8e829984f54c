"""The cookbook's `vlm_classifier` recipe, unmodified, trains and evaluates an image classifier offline on
the built-in tiny Qwen3-VL through a local-mode gateway.

Only the data source is replaced: the recipe loads `dpdl-benchmark/caltech101` with
`datasets.load_dataset`, and the subprocess runs it with that one function swapped for a generated set
of colored squares on black (labels: the colors), with the same features (an `Image` column and a
`ClassLabel`). Everything else is the recipe: its Qwen3-VL renderer turns each image into an
`ImageChunk` with the model's image processor, its supervised loop trains through forward_backward and
optim_step, its NLL evaluator runs forward, and its sampling evaluator samples from image prompts.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from tests.component.cookbook.test_cookbook_recipes import assert_final_checkpoints_registered, read_jsonl
from tests.component.cookbook.test_cookbook_recipes import recipe_env as cookbook_env
from tinkerkube_contract.models import TINY_QWEN3_VL

pytestmark = pytest.mark.slow

RECIPE = "tinker_cookbook.recipes.vlm_classifier.train"
# Runs the recipe's own module as __main__ after swapping `datasets.load_dataset` for generated images.
LAUNCHER = textwrap.dedent('''
    import random, runpy, sys
    import datasets
    from PIL import Image

    COLORS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 230)}

    def split(n, seed):
        rng = random.Random(seed)
        images, labels = [], []
        for i in range(n):
            label = i % len(COLORS)
            w, h = rng.randint(40, 140), rng.randint(40, 140)
            image = Image.new("RGB", (w, h), (0, 0, 0))
            x0, y0 = rng.randint(0, w // 3), rng.randint(0, h // 3)
            image.paste(list(COLORS.values())[label], (x0, y0, x0 + w // 2, y0 + h // 2))
            images.append(image)
            labels.append(label)
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(COLORS))})
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    def load_dataset(path, *args, **kwargs):
        assert path == "dpdl-benchmark/caltech101", path
        return datasets.DatasetDict({"train": split(12, 0), "test": split(6, 1)})

    datasets.load_dataset = load_dataset
    sys.argv = [sys.argv[0], *sys.argv[1:]]
    runpy.run_module("{recipe}", run_name="__main__", alter_sys=True)
''').replace("{recipe}", RECIPE)


@pytest.fixture(scope="module")
def vl_dir(model_cache_dir: Path) -> Path:
    from tinkerkube_trainer.model_store import prepare

    return prepare(TINY_QWEN3_VL, model_cache_dir)


def test_vlm_classifier_trains_evaluates_and_saves_on_generated_images(
        cookbook_gateway: str, vl_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    experiment_dir = tmp_path / "vlm"
    args = {"experiment_dir": experiment_dir, "model_name": vl_dir, "renderer_name": "qwen3_vl_instruct",
            "dataset": "caltech101", "batch_size": 4, "num_epochs": 1, "learning_rate": 5e-3, "lora_rank": 4,
            "eval_every": 2, "save_every": 0, "n_eval": 4, "max_tokens": 8, "max_length": 512,
            "behavior_if_log_dir_exists": "delete"}
    argv = [sys.executable, "-c", LAUNCHER, f"base_url={cookbook_gateway}", *(f"{k}={v}" for k, v in args.items())]
    done = subprocess.run(argv, cwd=tmp_path, env=cookbook_env(cookbook_gateway), capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"exited {done.returncode}\n--- stdout\n{done.stdout[-6000:]}" \
                                 f"\n--- stderr\n{done.stderr[-8000:]}"

    [log_path] = [p.parent for p in experiment_dir.rglob("metrics.jsonl")]
    metrics = read_jsonl(log_path / "metrics.jsonl")
    train = [m for m in metrics if "train_mean_nll" in m]
    assert [m["step"] for m in train] == [1, 2, 3], metrics  # 12 images, 4 a batch, one epoch
    for m in train:
        assert m["num_sequences"] == 4 and math.isfinite(m["train_mean_nll"]) and m["train_mean_nll"] > 0, m
    evals = [m for m in metrics if any(k.endswith("accuracy") for k in m)]
    assert evals, f"the sampling evaluator never reported: {metrics}"  # image prompts were sampled
    assert all(0.0 <= v <= 1.0 for m in evals for k, v in m.items() if k.endswith("accuracy"))
    nll = [v for m in metrics for k, v in m.items() if k.endswith("nll") and not k.startswith("train")]
    assert nll and all(math.isfinite(v) for v in nll), metrics  # the NLL evaluator's forward on images
    assert_final_checkpoints_registered(log_path, cookbook_gateway, str(vl_dir))
