"""What the OpenAI-compatible endpoint costs: tokens/s of concurrent chat completions through
`/oai/api/v1/chat/completions` vs the same work through the Tinker sampling API, measured in one run.

    .venv/bin/python bench/openai_compat.py              # tiny-qwen3, 8 concurrent chats x 64 tokens, ~1 min
    .venv/bin/python bench/openai_compat.py --quick      # smoke run
    .venv/bin/python bench/openai_compat.py --model HuggingFaceTB/SmolLM2-135M-Instruct --max-tokens 16 --rounds 2

Same work on both paths: the same 8 chat prompts, templated by the model's own chat template (the OpenAI
path renders them on the sampler's trainer, the Tinker path with the same tokenizer here), the same
max_tokens, temperature and per-request seeds, on the same sampler process (one tenant, one base model:
the gateway shares it). The seeds make both paths generate the very same tokens; the run checks that the
token counts agree. Each round sends 8 requests at once and waits for all; rounds alternate the order of
the paths so that load from other processes hits both alike. tokens/s = completion tokens / wall time.
goal: openai/tinker >= 0.90.

Streaming: then `--stream-rounds` streamed chats (one at a time, `--stream-tokens` tokens each) time the first
content chunk and the last one of the same request: time to first token / whole-sample latency, as a ratio
from the same run (live streaming sends the first token about one decode step after the prefill, so the ratio
is far below 1; a replayed stream would be ~1). goal: p50 ratio <= 0.25.

Loopback only; every loop is bounded; the gateway and its trainers are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _src in ("crds", "api_gateway", "trainer_pod", "."):
    if str(REPO / _src) not in sys.path:
        sys.path.insert(0, str(REPO / _src))

import openai  # noqa: E402
import tinker  # noqa: E402
from tinker import types  # noqa: E402

from tests.support.sdk import start_gateway  # noqa: E402
from tinkerkube_contract.models import SMOLLM2_135M, TINY_QWEN3  # noqa: E402

API_KEY = "tml-bench"
GOAL = 0.90
STREAM_GOAL = 0.25
TOPICS = ["the sea", "a lighthouse", "autumn", "a robot", "the moon", "a city at night", "a garden", "winter"]


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "system", "content": "You are a helpful assistant."},
             {"role": "user", "content": f"Write a short poem about {TOPICS[i % len(TOPICS)]}."}] for i in range(n)]


class OpenAIPath:
    def __init__(self, url: str, model: str, chats: list[list[dict[str, str]]], params: dict[str, Any]):
        self.client = openai.AsyncOpenAI(base_url=url + "/oai/api/v1", api_key=API_KEY, max_retries=0, timeout=600)
        self.model, self.chats, self.params = model, chats, params
        self.loop = asyncio.new_event_loop()

    async def _one(self, i: int, messages: list[dict[str, str]]) -> int:
        out = await self.client.chat.completions.create(model=self.model, messages=messages,  # type: ignore[arg-type]
                                                        seed=i, **self.params)
        return out.usage.completion_tokens if out.usage else 0

    def round(self) -> int:
        async def everyone() -> list[int]:
            return await asyncio.gather(*(self._one(i, m) for i, m in enumerate(self.chats)))

        return sum(self.loop.run_until_complete(everyone()))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()


class TinkerPath:
    def __init__(self, url: str, model: str, prompt_ids: list[list[int]], params: dict[str, Any]):
        self.service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        self.sampler = self.service.create_sampling_client(base_model=model).result()
        self.inputs = [types.ModelInput.from_ints(ids) for ids in prompt_ids]
        self.params = params

    def round(self) -> int:
        futures = [self.sampler.sample(x, 1, types.SamplingParams(seed=i, **self.params))
                   for i, x in enumerate(self.inputs)]
        return sum(len(seq.tokens) for f in futures for seq in f.result().sequences)

    def close(self) -> None:
        self.service.__exit__(None, None, None)  # finish the session as a `with` block would


def stream_latency(url: str, model: str, chat: list[dict[str, str]], max_tokens: int,
                   rounds: int) -> list[tuple[float, float, float, int]]:
    """Per round: (time to the first content chunk, time to the end of the stream, the same request's
    latency without `stream`, chunks with content)."""
    out = []
    with openai.OpenAI(base_url=url + "/oai/api/v1", api_key=API_KEY, max_retries=0, timeout=600) as client:
        for i in range(rounds):
            args: dict[str, Any] = {"model": model, "messages": chat, "max_tokens": max_tokens, "temperature": 0.8,
                                    "seed": i}
            started = time.perf_counter()
            client.chat.completions.create(**args)
            plain = time.perf_counter() - started
            started, first, chunks = time.perf_counter(), None, 0
            for chunk in client.chat.completions.create(**args, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    chunks += 1
                    first = time.perf_counter() - started if first is None else first
            out.append((first if first is not None else float("nan"), time.perf_counter() - started, plain, chunks))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=TINY_QWEN3, help=f"built-in model (default {TINY_QWEN3}; {SMOLLM2_135M}: "
                   "a real chat model, several seconds per 32-token sample on 2 CPU cores)")
    p.add_argument("--concurrency", type=int, default=8, help="chat requests in flight per round")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds per path (alternating order)")
    p.add_argument("--stream-rounds", type=int, default=3, help="streamed chats timed for time to first token")
    p.add_argument("--stream-tokens", type=int, default=256, help="max_tokens of each streamed chat")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 8 tokens")
    p.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "models")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.max_tokens, args.stream_rounds, args.stream_tokens = 2, 8, 1, 32
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally`: stop every process started
    from transformers import AutoTokenizer

    from tinkerkube_trainer.model_store import prepare

    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    print(f"# openai_compat: {command}", flush=True)
    print(f"# model {args.model}, {args.concurrency} concurrent chats x max_tokens {args.max_tokens}, "
          f"{args.rounds} rounds per path, {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(prepare(args.model, args.cache_dir))
    chats = prompts(args.concurrency)
    prompt_ids = [list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True)["input_ids"])
                  for c in chats]
    params = {"max_tokens": args.max_tokens, "temperature": 0.8}
    gw = start_gateway(Path(tempfile.mkdtemp(prefix="tk-bench-oai-")) / "gateway", model_cache_dir=args.cache_dir,
                       real_trainer=True, extra_env={"TINKERKUBE_GATEWAY_API_KEYS": json.dumps({API_KEY: "bench"})})
    paths: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        paths["openai"] = OpenAIPath(gw.url, args.model, chats, params)
        paths["openai"].round()  # warm-up: starts the sampler process (first request), connection pools
        paths["tinker"] = TinkerPath(gw.url, args.model, prompt_ids, params)
        paths["tinker"].round()
        print(f"  gateway + sampler ready and warmed up in {time.perf_counter() - t0:.1f} s", flush=True)
        tokens: dict[str, list[int]] = {name: [] for name in paths}
        seconds: dict[str, list[float]] = {name: [] for name in paths}
        for r in range(args.rounds):
            for name in (["openai", "tinker"] if r % 2 == 0 else ["tinker", "openai"]):
                started = time.perf_counter()
                tokens[name].append(paths[name].round())
                seconds[name].append(time.perf_counter() - started)
        rate = {name: sum(tokens[name]) / sum(seconds[name]) for name in paths}
        for name in paths:
            print(f"  {name:<7} {rate[name]:8.1f} tokens/s  ({sum(tokens[name])} tokens in {sum(seconds[name]):.2f} s;"
                  f" round p50 {statistics.median(seconds[name]):.2f} s)", flush=True)
        same = tokens["openai"] == tokens["tinker"]
        print(f"  same work: {'yes' if same else 'NO'} (completion tokens per round: openai {tokens['openai']}, "
              f"tinker {tokens['tinker']})", flush=True)
        ratio = rate["openai"] / rate["tinker"]
        paired = statistics.median((to / so) / (tt / st) for to, so, tt, st in zip(
            tokens["openai"], seconds["openai"], tokens["tinker"], seconds["tinker"], strict=True))
        print(f"  per-round paired ratio p50: {paired:.3f} (rounds ran back to back, so drifting load cancels)",
              flush=True)
        verdict = "ok" if ratio >= GOAL and same else "MISSED"
        print(f"openai/tinker tokens/s ratio: {ratio:.3f} (goal >= {GOAL}) {verdict}", flush=True)
        timed = stream_latency(gw.url, args.model, chats[0], args.stream_tokens, args.stream_rounds)
        ttft = statistics.median(first / whole for first, whole, _, _ in timed)
        cost = statistics.median(whole / plain for _, whole, plain, _ in timed)
        print(f"  streamed chats (max_tokens {args.stream_tokens}): first token p50 "
              f"{statistics.median(t[0] for t in timed):.3f} s, whole stream p50 "
              f"{statistics.median(t[1] for t in timed):.3f} s, the same request without stream p50 "
              f"{statistics.median(t[2] for t in timed):.3f} s, content chunks {[t[3] for t in timed]}", flush=True)
        print(f"  streamed / non-streamed whole-sample latency p50: {cost:.3f}", flush=True)
        print(f"time to first token / whole-sample latency p50: {ttft:.3f} (goal <= {STREAM_GOAL}) "
              f"{'ok' if ttft <= STREAM_GOAL else 'MISSED'}", flush=True)
        print(json.dumps({"command": command, "ratio": round(ratio, 4), "paired_p50": round(paired, 4),
                          "same_work": same, "ttft_over_whole_p50": round(ttft, 4),
                          "stream_over_plain_p50": round(cost, 4),
                          "tokens_per_s": {k: round(v, 2) for k, v in rate.items()}}), flush=True)
        return 0
    finally:
        for path in paths.values():
            with contextlib.suppress(Exception):  # the gateway is stopped whatever a client's close does
                path.close()
        gw.stop()


if __name__ == "__main__":
    raise SystemExit(main())
