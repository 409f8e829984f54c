"""Trainer pools through the real SDK: warm-pool clients, memory per run, co-batched SFT, batched sampling.

    .venv/bin/python bench/pool.py                                       # SmolLM2-135M, batch 8x128, LoRA r=16
    .venv/bin/python bench/pool.py --model tinkerkube/tiny-qwen3 --quick  # smoke run

One local-mode gateway (real trainer processes) and the real `tinker` SDK; every figure is measured in
this run, on this machine, with the compared paths interleaved round by round:

(a) creating a training client: the first one (cold: starts the pool and loads the base model) and then
    more on the warm pool, one after another. goal: warm p50 <= 1.0 s.
(b) host memory per extra run: the pool's rank-0 RSS with one trained run, then with K more (each trained
    one step, so its AdamW moments exist), per extra run, against 2 x (adapter + AdamW bytes) + 64 MiB
    (adapter + AdamW = what the trainer reports the run holds). goal: within that bound.
(c) SFT tokens/s (forward_backward(cross_entropy) + optim_step, batch x seq-len tokens a step): one run
    alone; 4 runs at once (their ops co-batched); the same 4 runs one at a time in the pool.
    goal: 4-at-once / alone >= 1.0; co-batched / one-at-a-time printed beside it.
(d) sampling tokens/s: 8 concurrent requests x 4 samples vs one request x 32 samples (same prompt,
    max_tokens, no stop). goal: >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _src in ("crds", "api_gateway", "trainer_pod", "."):
    if str(REPO / _src) not in sys.path:
        sys.path.insert(0, str(REPO / _src))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import tinker  # noqa: E402
from tinker import types  # noqa: E402

from tests.support.sdk import DEV_KEY, GatewayProc, start_gateway  # noqa: E402
from tinkerkube_contract import pod_api  # noqa: E402
from tinkerkube_contract.models import SMOLLM2_135M  # noqa: E402

MIB = 1024 * 1024
TOKEN = "bench-pool-token"  # the gateway's trainer token, so the bench can read a run's size from its pool


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2_135M)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--warm-clients", type=int, default=5, help="clients created on the warm pool for (a)")
    p.add_argument("--extra-runs", type=int, default=3, help="K runs added for the memory figure (b)")
    p.add_argument("--runs", type=int, default=4, help="concurrent runs for (c)")
    p.add_argument("--steps", type=int, default=2, help="SFT steps per run per round for (c)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per sample for (d)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--model-cache", type=Path, default=REPO / ".cache" / "models")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.warm_clients, args.extra_runs = 2, 32, 2, 1
        args.steps, args.rounds, args.max_tokens = 1, 1, 8
    return args


def batch(vocab: int, n: int, seq_len: int, seed: int) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(3, vocab, size=seq_len + 1).tolist()
        out.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                               loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * seq_len}))
    return out


def sft(client: tinker.TrainingClient, data: list[types.Datum], steps: int) -> None:
    for _ in range(steps):
        fb = client.forward_backward(data, "cross_entropy")
        step = client.optim_step(types.AdamParams(learning_rate=1e-4))
        fb.result()
        step.result()


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


class Bench:
    def __init__(self, args: argparse.Namespace, gw: GatewayProc) -> None:
        self.args, self.gw = args, gw
        self.service = tinker.ServiceClient(base_url=gw.url, api_key=DEV_KEY)
        self.vocab = 400 if "tiny" in args.model else 49152
        self.data = batch(self.vocab, args.batch, args.seq_len, seed=0)
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def new_client(self) -> tinker.TrainingClient:
        return self.service.create_lora_training_client(base_model=self.args.model, rank=self.args.rank).result()

    # (a)
    def clients(self) -> list[tinker.TrainingClient]:
        made: list[tinker.TrainingClient] = []
        cold = timed(lambda: made.append(self.new_client()))
        warm = [timed(lambda: made.append(self.new_client())) for _ in range(self.args.warm_clients)]
        p50 = statistics.median(warm)
        self.say(f"(a) create a client: cold {cold:.2f} s (starts the pool, loads {self.args.model}); warm pool "
                 f"p50 {p50:.3f} s, max {max(warm):.3f} s over {len(warm)}   goal p50 <= 1.0 s: "
                 f"{'MET' if p50 <= 1.0 else 'NOT MET'}")
        return made

    # (b)
    def rank0_rss(self) -> int:
        pools = self.gw.pools()
        (name,) = pools
        log = (self.gw.state_dir / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
        pid = next(json.loads(line)["pid"] for line in log
                   if line.startswith("{") and '"rank started"' in line and '"rank": 0' in line)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def run_bytes(self, client: tinker.TrainingClient) -> int:
        pools = self.gw.pools()
        (name,) = pools
        state = json.loads((self.gw.state_dir / "logs" / f"{name}.pool.json").read_text())
        headers = {pod_api.HEADER_TOKEN: TOKEN}
        info = httpx.get(state["url"] + pod_api.run_path(client.model_id), headers=headers, timeout=30).json()
        return int(info["num_bytes"])

    def memory(self, clients: list[tinker.TrainingClient]) -> None:
        k = self.args.extra_runs
        first, extra = clients[0], clients[1:1 + k]
        sft(first, self.data, 1)
        before = self.rank0_rss()
        for c in extra:
            sft(c, self.data, 1)
        per_run = (self.rank0_rss() - before) / max(1, len(extra))
        own = self.run_bytes(extra[0])
        bound = 2 * own + 64 * MIB
        self.say(f"(b) memory per extra run: {per_run / MIB:.1f} MiB RSS (K={len(extra)}); the run holds "
                 f"{own / MIB:.1f} MiB (adapter + AdamW); bound 2 x that + 64 MiB = {bound / MIB:.1f} MiB: "
                 f"{'MET' if per_run <= bound else 'NOT MET'}")

    # (c)
    def throughput(self, clients: list[tinker.TrainingClient]) -> None:
        a, s = self.args, self.args.steps
        runs = clients[:a.runs]
        tokens_per_step = a.batch * a.seq_len
        alone_t, together_t, sequential_t = [], [], []
        with ThreadPoolExecutor(a.runs) as pool:
            for _ in range(a.rounds):
                alone_t.append(timed(lambda: sft(runs[0], self.data, s)))
                together_t.append(timed(lambda: list(pool.map(lambda c: sft(c, self.data, s), runs))))
                sequential_t.append(timed(lambda: [sft(c, self.data, s) for c in runs]))
        alone = tokens_per_step * s * a.rounds / sum(alone_t)
        together = tokens_per_step * s * a.runs * a.rounds / sum(together_t)
        sequential = tokens_per_step * s * a.runs * a.rounds / sum(sequential_t)
        self.say(f"(c) SFT tokens/s: 1 run alone {alone:.1f}; {a.runs} runs at once {together:.1f}; the same "
                 f"{a.runs} one at a time {sequential:.1f}")
        self.say(f"    {a.runs}-at-once / alone = {together / alone:.3f}   goal >= 1.0: "
                 f"{'MET' if together / alone >= 1.0 else 'NOT MET'};  co-batched / one-at-a-time = "
                 f"{together / sequential:.3f}")

    # (d)
    def sampling(self) -> None:
        a = self.args
        sampler = self.service.create_sampling_client(base_model=a.model)
        prompt = types.ModelInput.from_ints(list(range(5, 21)))

        def params(seed: int) -> types.SamplingParams:
            return types.SamplingParams(max_tokens=a.max_tokens, temperature=1.0, stop=[], seed=seed)

        def one_big() -> int:
            out = sampler.sample(prompt, 32, params(1)).result()
            return sum(len(s.tokens) for s in out.sequences)

        def eight_small() -> int:
            futures = [sampler.sample(prompt, 4, params(10 + i)) for i in range(8)]
            return sum(len(s.tokens) for f in futures for s in f.result().sequences)

        one_big()  # warm-up
        big_tokens = small_tokens = 0
        big_t = small_t = 0.0
        for _ in range(a.rounds):
            started = time.perf_counter()
            big_tokens += one_big()
            big_t += time.perf_counter() - started
            started = time.perf_counter()
            small_tokens += eight_small()
            small_t += time.perf_counter() - started
        big, small = big_tokens / big_t, small_tokens / small_t
        self.say(f"(d) sampling tokens/s: 1 request x 32 samples {big:.1f}; 8 concurrent requests x 4 samples "
                 f"{small:.1f}; ratio {small / big:.3f}   goal >= 0.8: {'MET' if small / big >= 0.8 else 'NOT MET'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tinkerkube-bench-pool-") as tmp:
        gw = start_gateway(Path(tmp) / "state", model_cache_dir=args.model_cache, real_trainer=True,
                           extra_env={"TINKERKUBE_GATEWAY_TRAINER_START_TIMEOUT_SECONDS": "600",
                                      "TINKERKUBE_GATEWAY_TRAINER_AUTH_TOKEN": TOKEN,
                                      "TINKERKUBE_GATEWAY_POOL_MAX_RUNS": str(max(8, args.warm_clients + 2))})
        try:
            bench = Bench(args, gw)
            print(f"model {args.model}, batch {args.batch} x {args.seq_len}, LoRA r={args.rank}", flush=True)
            clients = bench.clients()
            bench.memory(clients)
            bench.throughput(clients)
            bench.sampling()
        finally:
            gw.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
