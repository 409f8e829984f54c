"""Trainer service throughput vs a bare in-process loop, measured in the same run.

Training: tokens/s of forward_backward + optim_step through the trainer's pod API (a real torchrun
process, 1 rank, launched exactly as the launchers do) against a bare peft loop in this process
(same SmolLM2-135M, same LoRA config, same batch, torch AdamW, summed cross-entropy).
Sampling: generated tokens/s through the API against plain HF `generate` on the same peft-wrapped
model and prompts (the trainer samples with its adapter attached, so the baseline does too).

Fairness: both sides use the same number of CPU threads (`--threads`, default 1 = what torchrun
gives each worker): the trainer gets OMP_NUM_THREADS, this process torch.set_num_threads. Rounds of
service steps and baseline steps are interleaved so that load from other processes hits both alike.

    .venv/bin/python bench/trainer_step.py            # 8 x 128 tokens, 2 warmup + 4 measured steps
    .venv/bin/python bench/trainer_step.py --quick    # smoke run (fewer, shorter steps)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for sub in ("crds", "api_gateway", "operator", "trainer_pod", ""):
    sys.path.insert(0, str(ROOT / sub) if sub else str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tests.support.fakes import forward_backward_body, json_body  # noqa: E402
from tests.support.trainer_proc import PodClient, start_trainer  # noqa: E402
from tinkerkube_contract import pod_api as api  # noqa: E402
from tinkerkube_contract.models import SMOLLM2_135M  # noqa: E402
from tinkerkube_contract.pod_api import OpKind  # noqa: E402
from tinkerkube_contract.resource import LoraSpec, TrainingSessionSpec  # noqa: E402

ADAM = api.AdamParams(learning_rate=1e-4)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="datums per forward_backward")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per datum")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per side")
    p.add_argument("--steps", type=int, default=4, help="measured training steps per side")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds the measured steps are split into")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for both sides")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--prompts", type=int, default=2, help="sampling requests (one prompt each) per round")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--no-sample", action="store_true", help="skip the sampling benchmark")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny step counts and shapes")
    p.add_argument("--model-cache", type=Path, default=None, help="default: $TINKERKUBE_TRAINER_MODEL_CACHE_DIR "
                   "or .cache/models")
    args = p.parse_args()
    if args.quick:
        args.batch, args.seq_len, args.warmup, args.steps, args.rounds = 2, 32, 1, 2, 2
        args.prompts, args.num_samples, args.max_tokens = 1, 2, 8
    args.rounds = max(1, min(args.rounds, args.steps))
    return args


# ---- baseline: a bare peft loop in this process -----------------------------------------------------


class Bare:
    def __init__(self, model_dir: Path, lora: LoraSpec) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from tinkerkube_trainer.lora import target_modules

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.eval()
        model.requires_grad_(False)
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, bias="none",
                            target_modules=target_modules(model, lora), task_type="CAUSAL_LM")
        torch.manual_seed(0)
        self.model = get_peft_model(model, config)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=ADAM.learning_rate, betas=(ADAM.beta1, ADAM.beta2), eps=ADAM.eps,
                                     weight_decay=0.0)

    def train_step(self, batch: torch.Tensor) -> None:
        x, y = batch[:, :-1], batch[:, 1:]
        logits = self.model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @torch.inference_mode()
    def sample(self, prompt: list[int], n: int, max_tokens: int, seed: int) -> int:
        torch.manual_seed(seed)
        ids = torch.tensor([prompt])
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                  temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_tokens,
                                  min_new_tokens=max_tokens, num_return_sequences=n, pad_token_id=0)
        return int((out.shape[1] - ids.shape[1]) * out.shape[0])


# ---- the service ---------------------------------------------------------------------------------


class Service:
    def __init__(self, client: PodClient, fb_body: bytes, model_id: str) -> None:
        self.client, self.fb_body, self.seq, self.model_id = client, fb_body, 0, model_id
        self.optim_body = json_body(api.OptimStepOp(adam_params=ADAM))

    def train_step(self) -> None:
        fb, opt = self.seq + 1, self.seq + 2
        self.seq += 2
        self.client.put_op(fb, OpKind.FORWARD_BACKWARD, self.fb_body)  # submitted back to back, like the SDK
        self.client.put_op(opt, OpKind.OPTIM_STEP, self.optim_body)
        self.client.result(fb)
        self.client.result(opt)

    def sample(self, prompt: list[int], n: int, max_tokens: int, seed: int) -> int:
        from tinker.proto.response_conv import deserialize_sample_response

        request = {"prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]}, "num_samples": n,
                   "sampling_params": {"max_tokens": max_tokens, "temperature": 1.0, "stop": [], "seed": seed}}
        rid = f"bench-{time.monotonic_ns()}"
        self.client.put_sample(rid, api.SampleOp(request=request, model_id=self.model_id).model_dump_json().encode())
        resp = deserialize_sample_response(self.client.sample_result(rid).content)
        return sum(len(s.tokens) for s in resp.sequences)


def op_seconds(client: PodClient) -> float:
    """Seconds the trainer spent executing ops (its tinkerkube_trainer_op_seconds histogram)."""
    total = 0.0
    for line in client.http.get(api.METRICS_PATH).text.splitlines():
        if line.startswith("tinkerkube_trainer_op_seconds_sum"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleave(rounds: int, total: int, service: Callable[[], float], bare: Callable[[], float]) -> tuple[float, float]:
    """Total seconds (service, bare) over `total` steps each, in alternating rounds."""
    s = b = 0.0
    per_round = [total // rounds + (1 if i < total % rounds else 0) for i in range(rounds)]
    for i, k in enumerate(per_round):
        first, second = (service, bare) if i % 2 == 0 else (bare, service)
        for _ in range(k):
            t1 = first()
            t2 = second()
            s, b = (s + t1, b + t2) if first is service else (s + t2, b + t1)
    return s, b


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: stop the trainer
    from tinkerkube_trainer.model_store import prepare

    cache = args.model_cache or Path(os.environ.get("TINKERKUBE_TRAINER_MODEL_CACHE_DIR", ROOT / ".cache" / "models"))
    model_dir = prepare(SMOLLM2_135M, Path(cache))
    torch.set_num_threads(args.threads)
    lora = LoraSpec(rank=args.lora_rank, alpha=float(args.lora_rank), seed=0)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    batch = rng.integers(0, vocab, size=(args.batch, args.seq_len + 1))
    tokens_per_step = args.batch * args.seq_len
    print(f"model {SMOLLM2_135M}  batch {args.batch} x {args.seq_len} tokens  LoRA r={args.lora_rank}  "
          f"threads {args.threads} on both sides (trainer: OMP_NUM_THREADS, baseline: torch.set_num_threads)")

    spec = TrainingSessionSpec(base_model=SMOLLM2_135M, model_id="bench:train:0", owner="bench", lora=lora)
    tmp = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    group = start_trainer(spec, checkpoint_dir=tmp / "ckpt", model_cache_dir=Path(cache), nproc_per_node=1,
                          log_dir=tmp / "logs", extra_env={"OMP_NUM_THREADS": str(args.threads)})
    try:
        started = time.monotonic()
        group.wait_ready(600)
        print(f"trainer ready in {time.monotonic() - started:.1f}s at {group.url} (logs: {tmp / 'logs'})")
        client = group.client(timeout=600)
        service = Service(client, forward_backward_body(batch.tolist()), spec.model_id)
        bare = Bare(model_dir, lora)
        batch_t = torch.as_tensor(batch)
        for _ in range(args.warmup):
            service.train_step()
            bare.train_step(batch_t)
        before = op_seconds(client)
        s, b = interleave(args.rounds, args.steps, lambda: timed(service.train_step),
                          lambda: timed(lambda: bare.train_step(batch_t)))
        engine_s = op_seconds(client) - before
        tok = tokens_per_step * args.steps
        print(f"train  service {tok / s:9.1f} tok/s   bare peft loop {tok / b:9.1f} tok/s   "
              f"ratio {b / s:.3f}  (goal >= 0.95; {args.steps} steps of fb+optim each)")
        print(f"       service wall {s:.2f}s = engine compute {engine_s:.2f}s (trainer's op_seconds) + runtime "
              f"{s - engine_s:.3f}s (HTTP, queue, decode: {100 * (s - engine_s) / s:.2f}%)")
        if not args.no_sample:
            bench_sampling(args, service, bare, vocab, rng)
        client.close()
    finally:
        group.stop()
    return 0


def bench_sampling(args: argparse.Namespace, service: Service, bare: Bare, vocab: int,
                   rng: np.random.Generator) -> None:
    prompts = [rng.integers(0, vocab, size=int(rng.integers(16, 48))).tolist() for _ in range(args.prompts)]
    counts = {"service": 0, "bare": 0}

    def run(side: str, fn: Callable[..., int]) -> Callable[[], float]:
        def go() -> float:
            start = time.perf_counter()
            for i, prompt in enumerate(prompts):
                counts[side] += fn(prompt, args.num_samples, args.max_tokens, i)
            return time.perf_counter() - start
        return go

    service.sample(prompts[0], args.num_samples, args.max_tokens, 0)  # warmup
    bare.sample(prompts[0], args.num_samples, args.max_tokens, 0)
    s, b = interleave(args.rounds, args.rounds, run("service", service.sample), run("bare", bare.sample))
    rs, rb = counts["service"] / s, counts["bare"] / b
    print(f"sample service {rs:9.1f} tok/s   HF generate    {rb:9.1f} tok/s   ratio {rs / rb:.3f}  "
          f"(goal >= 0.95; {args.prompts} prompts x {args.num_samples} samples x {args.max_tokens} tokens, "
          f"{args.rounds} rounds)")


if __name__ == "__main__":
    sys.exit(main())
