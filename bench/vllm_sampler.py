"""Sampling throughput of a pool's `sampler: vllm` against our own HF decode loop (`sampler: hf`), and a
smoke check that both answer alike. Made for a GPU; runs on the CPU too (where vLLM is not faster).

    .venv/bin/python bench/vllm_sampler.py --quick                                  # CPU smoke, tiny model
    .venv/bin/python bench/vllm_sampler.py --device cuda --vllm-python /opt/vllm/bin/python   # a GPU

Two real trainer pools (real torchrun, real pod HTTP API) of the same base model and run, each trained one
step and its sampler weights saved; then, round by round and interleaved, C concurrent sample requests x
N samples x T new tokens (no stop) through each, with the run's adapter. Prints tokens/s of each, the
ratio vllm/hf, and the greedy smoke check (same tokens, max |logprob difference|).
`--vllm-python`: the Python of a venv holding vLLM (`make vllm-venv` makes the CPU build in
.cache/vllm-venv; on a GPU, a venv with the CUDA `vllm` wheel).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _src in ("crds", "api_gateway", "trainer_pod", "."):
    if str(REPO / _src) not in sys.path:
        sys.path.insert(0, str(REPO / _src))

import numpy as np  # noqa: E402
from tinker.proto.response_conv import deserialize_sample_response  # noqa: E402

from tests.support.fakes import forward_backward_body, json_body  # noqa: E402
from tests.support.trainer_proc import PodClient, start_trainer  # noqa: E402
from tinkerkube_contract import env  # noqa: E402
from tinkerkube_contract import pod_api as api  # noqa: E402
from tinkerkube_contract.models import SMOLLM2_135M  # noqa: E402
from tinkerkube_contract.pod_api import OpKind  # noqa: E402
from tinkerkube_contract.resource import LoraSpec, TrainingSessionSpec  # noqa: E402

MODEL_ID = "bench-vllm:train:0"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2_135M, help="a built-in name or a local model directory")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--vllm-python", type=Path, default=REPO / ".cache" / "vllm-venv" / "bin" / "python")
    p.add_argument("--dtype", default="float32", help="the vLLM server's dtype (float32: exact RL logprobs)")
    p.add_argument("--concurrency", type=int, default=8, help="sample requests in flight at once")
    p.add_argument("--samples", type=int, default=4, help="num_samples per request")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="tiny head_dim-32 model and sizes: a smoke run")
    p.add_argument("--model-cache", type=Path, default=REPO / ".cache" / "models")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.samples, args.max_tokens, args.rounds, args.rank = 4, 2, 16, 1, 8
    return args


def vllm_env(args: argparse.Namespace) -> dict[str, str]:
    extra_args = ["--max-model-len", str(args.prompt_len + args.max_tokens + 64), "--seed", "0"]
    server_env: dict[str, str] = {}
    if args.device == "cpu":
        extra_args += ["--distributed-executor-backend", "uni"]
        server_env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    else:
        extra_args += ["--gpu-memory-utilization", "0.4"]  # the trainer holds the same GPU
    return {env.SAMPLER: "vllm", env.PREFIX + "VLLM_PYTHON": str(args.vllm_python),
            env.PREFIX + "VLLM_DTYPE": args.dtype, env.PREFIX + "VLLM_ARGS": json.dumps(extra_args),
            env.PREFIX + "VLLM_ENV": json.dumps(server_env), env.PREFIX + "MAX_SAMPLE_ROWS": "256"}


def sample_once(client: PodClient, rid: str, prompt: list[int], n: int, max_tokens: int, temperature: float,
                seed: int | None) -> Any:
    op = api.SampleOp(request={"prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]}, "num_samples": n,
                               "sampling_params": {"max_tokens": max_tokens, "temperature": temperature, "stop": [],
                                                   "seed": seed}},
                      model_id=MODEL_ID)
    client.put_sample(rid, op.model_dump_json().encode())
    return deserialize_sample_response(client.sample_result(rid, timeout=1800).content)


def throughput(client: PodClient, tag: str, args: argparse.Namespace, prompts: list[list[int]]) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        outs = list(pool.map(lambda i: sample_once(client, f"{tag}-{i}", prompts[i], args.samples, args.max_tokens,
                                                   1.0, i), range(args.concurrency)))
    elapsed = time.perf_counter() - started
    return sum(len(s.tokens) for o in outs for s in o.sequences) / elapsed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    model = args.model
    if args.quick:
        from tinkerkube_trainer.model_store import build_tiny_qwen3

        model = str(tmp / "tiny-qwen3-hd32")
        build_tiny_qwen3(Path(model), head_dim=32)
    spec = TrainingSessionSpec(base_model=model, model_id=MODEL_ID, owner="bench",
                               lora=LoraSpec(rank=args.rank, alpha=2 * args.rank, seed=1))
    rng = np.random.default_rng(0)
    vocab = 400 if args.quick else 40000
    data = [rng.integers(3, vocab, size=args.prompt_len + 1).tolist() for _ in range(4)]
    prompts = [rng.integers(3, vocab, size=args.prompt_len).tolist() for _ in range(args.concurrency)]
    with contextlib.ExitStack() as stack:
        clients: dict[str, PodClient] = {}
        started = {}
        for name, extra in (("hf", {env.PREFIX + "MAX_SAMPLE_ROWS": "256"}), ("vllm", vllm_env(args))):
            group = start_trainer(spec, checkpoint_dir=tmp / name / "ckpt", model_cache_dir=args.model_cache,
                                  log_dir=tmp / name / "logs", extra_env=extra, device=args.device)
            stack.callback(group.stop)
            started[name] = (group, time.perf_counter())
        for name, (group, t0) in started.items():
            try:
                group.wait_ready(1800)
            except Exception:
                print(group.logs()[-6000:])
                raise
            print(f"{name}: pool ready in {time.perf_counter() - t0:.1f} s")
            clients[name] = group.client(timeout=1800)
            stack.callback(clients[name].close)
            clients[name].run(1, OpKind.FORWARD_BACKWARD, forward_backward_body(data), timeout=1800)
            clients[name].run(2, OpKind.OPTIM_STEP,
                              json_body(api.OptimStepOp(adam_params=api.AdamParams(learning_rate=1e-3))))
            clients[name].run(3, OpKind.SAVE_SAMPLER_WEIGHTS, json_body(api.SaveSamplerWeightsOp(snapshot_id="s1")))

        greedy = {n: sample_once(c, f"greedy-{n}", prompts[0], 1, args.max_tokens, 0.0, None)
                  for n, c in clients.items()}
        same = greedy["hf"].sequences[0].tokens == greedy["vllm"].sequences[0].tokens
        agree = next((i for i, (a, b) in enumerate(zip(greedy["hf"].sequences[0].tokens,
                                                       greedy["vllm"].sequences[0].tokens, strict=False)) if a != b),
                     len(greedy["hf"].sequences[0].tokens))
        diff = float(np.max(np.abs(np.subtract(greedy["hf"].sequences[0].logprobs[:agree],
                                               greedy["vllm"].sequences[0].logprobs[:agree])))) if agree else 0.0
        print(f"smoke: greedy tokens identical: {same} (first {agree} agree); max |logprob diff| over them: {diff:.2e}")

        for name, client in clients.items():  # warm-up (vLLM compiles / allocates on first use)
            throughput(client, f"warm-{name}", argparse.Namespace(**{**vars(args), "max_tokens": 4}), prompts)
        rates: dict[str, list[float]] = {"hf": [], "vllm": []}
        for r in range(args.rounds):
            for name, client in clients.items():
                rates[name].append(throughput(client, f"r{r}-{name}", args, prompts))
                print(f"round {r} {name}: {rates[name][-1]:.1f} tok/s")
    hf, vl = float(np.median(rates["hf"])), float(np.median(rates["vllm"]))
    print(f"model={model} device={args.device} dtype={args.dtype} concurrency={args.concurrency} "
          f"samples={args.samples} max_tokens={args.max_tokens}")
    print(f"hf decode: {hf:.1f} tok/s   vllm: {vl:.1f} tok/s   ratio vllm/hf: {vl / hf:.2f}")
    return 0 if same or agree > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
