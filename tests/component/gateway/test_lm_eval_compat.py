"""lm-eval's OpenAI-completions backend (`local-completions`) runs a small local task against the gateway,
offline: a generate_until task (greedy text with a stop) and a multiple-choice task (loglikelihoods from
`echo` + `logprobs`), both on the tiny model through `/oai/api/v1/completions`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.component.gateway.conftest import TINY
from tests.support.sdk import GatewayProc

ALICE = "tml-alice"
ROWS = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b + 3)],
         "answer": 0, "answer_text": str(a + b)} for a, b in ((1, 2), (3, 4), (5, 6))]
COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{question}}}} Answer:"
"""
TASKS = {
    "tk_arith_gen": """output_type: generate_until
doc_to_target: "{{answer_text}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
    "tk_arith_mc": """output_type: multiple_choice
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
}


def _write_tasks(folder: Path) -> None:
    data = folder / "arith.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    for name, body in TASKS.items():
        (folder / f"{name}.yaml").write_text(f"task: {name}\n" + COMMON.format(data=data) + body)


@pytest.mark.slow
def test_lm_eval_local_completions_runs_a_local_task(compat_gateway: GatewayProc, tiny_model_dir: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    for offline in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(offline, "1")
    monkeypatch.setenv("OPENAI_API_KEY", ALICE)
    _write_tasks(tmp_path)
    out: dict[str, Any] = lm_eval.simple_evaluate(
        model="local-completions", tasks=list(TASKS), task_manager=TaskManager(include_path=str(tmp_path)),
        model_args={"model": TINY, "base_url": compat_gateway.url + "/oai/api/v1/completions",
                    "tokenizer_backend": "huggingface", "tokenizer": str(tiny_model_dir), "num_concurrent": 2,
                    "max_retries": 1},
        log_samples=True)
    assert 0.0 <= out["results"]["tk_arith_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= out["results"]["tk_arith_mc"]["acc,none"] <= 1.0
    with openai.OpenAI(base_url=compat_gateway.url + "/oai/api/v1", api_key=ALICE, max_retries=0) as client:
        for sample in out["samples"]["tk_arith_gen"]:  # lm-eval read back what the endpoint generates
            prompt, gen_kwargs = sample["arguments"][0]
            assert gen_kwargs["until"] == ["\n"]
            direct = client.completions.create(model=TINY, prompt=prompt, max_tokens=6, stop=["\n"], temperature=0)
            assert sample["resps"][0][0] == direct.choices[0].text
    for sample in out["samples"]["tk_arith_mc"]:
        scores = [resp[0][0] for resp in sample["resps"]]
        assert len(scores) == 3 and all(math.isfinite(s) and s < 0 for s in scores)
        assert len(set(scores)) > 1  # each choice scored on its own continuation
