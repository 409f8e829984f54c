"""The vLLM sampler's request mapping: our stop semantics, limits and refusals in vLLM's terms (the
answers themselves are checked against a real vLLM server in tests/component/trainer/test_vllm_sampler.py)."""

from __future__ import annotations

from tinkerkube_trainer.codec import SampleParams
from tinkerkube_trainer.vllm_sampler import parse_response, request_body
from tinkerkube_trainer.vllm_server import VllmServerConfig, server_command

EOS = [7, 3]


def test_default_stop_is_eos_and_empty_stop_never_stops() -> None:
    plain = request_body(SampleParams(prompt=(1, 2)), "a", EOS)
    assert plain["stop_token_ids"] == [3, 7] and plain["ignore_eos"] is False and plain["stop"] == []
    never = request_body(SampleParams(prompt=(1, 2), stop_strings=(), stop_tokens=()), "a", EOS)
    assert never["stop_token_ids"] == [] and never["ignore_eos"] is True


def test_stops_are_added_to_eos_and_empty_strings_dropped() -> None:
    body = request_body(SampleParams(prompt=(1,), stop_strings=("\n\n", ""), stop_tokens=(9,)), "run-x", EOS)
    assert body["stop"] == ["\n\n"] and body["stop_token_ids"] == [3, 7, 9] and body["model"] == "run-x"
    assert body["include_stop_str_in_output"] is True and body["prompt"] == [1]


def test_sampling_params_logprob_flags_and_seed() -> None:
    params = SampleParams(prompt=(4, 5, 6), num_samples=3, max_tokens=9, temperature=0.7, top_k=0, top_p=0.9,
                          seed=2**64 + 5, prompt_logprobs=True, topk_sample_logprobs=2)
    body = request_body(params, "a", EOS)
    assert (body["n"], body["max_tokens"], body["temperature"], body["top_k"], body["top_p"]) == (3, 9, 0.7, -1, 0.9)
    assert body["seed"] == (2**64 + 5) % 2**63 and body["logprobs"] == 2
    assert "prompt_logprobs" not in body  # the trainer scores prompts itself


def test_sampled_tokens_logprobs_and_topk_are_shaped_like_the_hf_paths() -> None:
    params = SampleParams(prompt=(4, 5), num_samples=2, max_tokens=2, topk_sample_logprobs=2)
    choice = lambda i, ids, reason: {  # noqa: E731
        "index": i, "token_ids": ids, "finish_reason": reason,
        "logprobs": {"tokens": [f"token_id:{t}" for t in ids], "token_logprobs": [-0.5] * len(ids),
                     "top_logprobs": [{f"token_id:{t}": -0.5, "token_id:99": -0.1, "token_id:98": -3.0}
                                      for t in ids]}}
    result = parse_response(params, {"choices": [choice(1, [7], "stop"), choice(0, [11, 12], "length")]})
    assert [s.tokens for s in result.sequences] == [[11, 12], [7]]
    assert [s.stopped for s in result.sequences] == [False, True]
    assert result.sequences[0].topk_ids.tolist() == [[99, 11], [99, 12]] and result.prompt_logprobs is None


def test_server_command_rounds_the_lora_rank_up_to_one_vllm_accepts() -> None:
    cmd = server_command(VllmServerConfig(python="/v/bin/python", extra_args=("--x",)), "/m", 8123, 100, 4)
    assert cmd[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--max-lora-rank") + 1] == "128" and cmd[cmd.index("--dtype") + 1] == "float32"
    assert cmd[-1] == "--x" and cmd[cmd.index("--model") + 1] == "/m"


def test_greedy_asks_once_and_answers_num_samples_copies() -> None:
    params = SampleParams(prompt=(4,), num_samples=3, max_tokens=1, temperature=0.0)
    assert request_body(params, "a", EOS)["n"] == 1
    answer = {"choices": [{"index": 0, "token_ids": [5], "finish_reason": "length",
                           "logprobs": {"tokens": ["token_id:5"], "token_logprobs": [-0.25], "top_logprobs": None}}]}
    assert [s.tokens for s in parse_response(params, answer).sequences] == [[5], [5], [5]]
