"""Run a cookbook recipe module with some Hugging Face Hub datasets served from local JSON Lines files.

Why: recipes such as `preference/dpo/train.py dataset=hhh` call `datasets.load_dataset("Anthropic/hh-rlhf")`
themselves and offer no way to point them at a local file. This runner swaps only that data source: a
`datasets.load_dataset` call for a mapped hub id loads the given files with the `json` builder instead
(same splits, same columns), every other call goes through untouched, and then the recipe module runs as
`__main__` exactly as `python -m` would run it. Nothing in the recipe or its training code changes.

Usage (a file path, so it needs nothing on sys.path):
    python local_hub_datasets.py '{"Anthropic/hh-rlhf": {"train": "/d/train.jsonl", "test": "/d/test.jsonl"}}' \\
        tinker_cookbook.recipes.preference.dpo.train key=value ...
"""

from __future__ import annotations

import functools
import json
import runpy
import sys
from typing import Any


def serve_locally(mapping: dict[str, dict[str, str]]) -> None:
    """Patch `datasets.load_dataset` so that each hub id in `mapping` ({id: {split: jsonl path}}) loads
    its local files; a `split=` argument selects one split as the hub would."""
    import datasets

    hub_load = datasets.load_dataset

    @functools.wraps(hub_load)
    def load_dataset(path: str, *args: Any, **kwargs: Any) -> Any:
        if path not in mapping:
            return hub_load(path, *args, **kwargs)
        split = kwargs.get("split")
        return hub_load("json", data_files=mapping[path], split=split)

    datasets.load_dataset = load_dataset


def main(argv: list[str]) -> None:
    mapping, module, *recipe_args = argv
    serve_locally(json.loads(mapping))
    sys.argv = [module, *recipe_args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
