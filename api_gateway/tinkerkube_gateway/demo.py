"""`make demo`: a short supervised loop and a short RL loop, driven by the real `tinker` SDK.

    python -m tinkerkube_gateway.demo                       # SmolLM2-135M-Instruct on a local gateway
    python -m tinkerkube_gateway.demo --model tinkerkube/tiny-qwen3 --sft-steps 2 --rl-steps 1

Starts a local-mode gateway as a subprocess on a free port (or uses the gateway that TINKER_BASE_URL
names, as the SDK resolves it), then: samples an answer before training, runs a few supervised steps on
a handful of chat examples (the loss per step should fall), samples again, and runs a few RL steps on a
tiny arithmetic task (reward = the answer is right; `importance_sampling`; a fresh sampling client from
`save_weights_and_get_sampling_client` every step). A client script: it imports the SDK, never the trainer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import tinker
from tinker import types
from tinker.lib.base_url import DEFAULT_BASE_URL, resolve_base_url

from tinkerkube_contract.models import DEFAULT_MODEL
from tinkerkube_gateway.settings import ENV_PREFIX, inherited_environment

DEMO_KEY = "tml-demo"
STARTUP_TIMEOUT_S = 60.0
BAR_WIDTH = 20

SYSTEM = "Be brief."  # short on purpose: every token costs time on a CPU, and some templates add a long default
SFT_EXAMPLES = (
    ("Who are you?", "I am Tinky, tuned with tinkerkube."),
    ("What is tinkerkube?", "Tinker training on Kubernetes."),
    ("Say hello.", "Hello from tinkerkube!"),
    ("What is your name?", "My name is Tinky."),
    ("What is 2 + 3? Answer with just the number.", "5"),
    ("What is 4 + 4? Answer with just the number.", "8"),
)
PROBE_PROMPT = "Who are you?"


@dataclass(frozen=True)
class Gateway:
    url: str
    api_key: str | None  # None: the SDK's own resolution (TINKER_API_KEY, ...)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _log_tail(path: Path | None, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path and path.exists() else ""


def _wait_healthy(gw: Gateway) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if gw.proc is not None and gw.proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with code {gw.proc.returncode}:\n{_log_tail(gw.log_path)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(gw.url + "/api/v1/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the gateway was not healthy within {STARTUP_TIMEOUT_S:.0f} s:\n{_log_tail(gw.log_path)}")


def _stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the gateway stops its trainers on the way out
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def gateway(api_key: str | None) -> Iterator[Gateway]:
    """The gateway TINKER_BASE_URL names, else a local-mode one of our own for the `with` block."""
    url = resolve_base_url()
    if url != DEFAULT_BASE_URL:
        print(f"using the gateway at {url}", flush=True)
        yield Gateway(url, api_key)
        return
    state = Path(tempfile.mkdtemp(prefix="tinkerkube-demo-"))
    port = _free_port()
    env = inherited_environment()
    env.update({ENV_PREFIX + "HOST": "127.0.0.1", ENV_PREFIX + "PORT": str(port),
                ENV_PREFIX + "STATE_DIR": str(state), ENV_PREFIX + "API_KEYS": json.dumps({DEMO_KEY: "demo"}),
                "TINKER_TELEMETRY": "0"})
    log_path = state / "gateway.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tinkerkube_gateway.main"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    gw = Gateway(f"http://127.0.0.1:{port}", DEMO_KEY, proc, log_path)
    print(f"started a local gateway on {gw.url} (log {log_path})", flush=True)
    try:
        _wait_healthy(gw)
        yield gw
    finally:
        _stop(proc)
        print("gateway stopped", flush=True)


# ---------------------------------------------------------------------------------------------- display


def bar(step: int, total: int) -> str:
    done = round(BAR_WIDTH * step / max(total, 1))
    return "[" + "#" * done + "-" * (BAR_WIDTH - done) + f"] {step}/{total}"


def progress(tag: str, step: int, total: int, **figures: object) -> None:
    """One line per step (so logs keep every loss): `[sft] [#####---] 2/8 loss 1.2345 ...`."""
    shown = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
    print(f"[{tag}] {bar(step, total)}  {shown}", flush=True)


# ---------------------------------------------------------------------------------------------- data


def chat_prompt(tokenizer: Any, question: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def sft_datum(tokenizer: Any, question: str, answer: str) -> types.Datum:
    """Prompt tokens weigh 0, the answer (and its end-of-turn token) 1; targets are the next tokens."""
    prompt = chat_prompt(tokenizer, question)
    completion = [*tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]
    tokens = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights})


def rl_datum(prompt: list[int], seq: types.SampledSequence, advantage: float) -> types.Datum:
    tokens = prompt + list(seq.tokens)
    pad = len(prompt) - 1
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
        "target_tokens": tokens[1:],
        "logprobs": [0.0] * pad + [float(x) for x in (seq.logprobs or [])],
        "advantages": [0.0] * pad + [advantage] * len(seq.tokens)})


def first_int(text: str) -> int | None:
    found = re.search(r"-?\d+", text)
    return int(found.group()) if found else None


# ---------------------------------------------------------------------------------------------- loops


def sample_text(sampler: tinker.SamplingClient, tokenizer: Any, question: str, max_tokens: int) -> str:
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                  stop=[tokenizer.eos_token_id])
    result = sampler.sample(types.ModelInput.from_ints(chat_prompt(tokenizer, question)), 1, params).result()
    return tokenizer.decode(result.sequences[0].tokens, skip_special_tokens=True).strip()


def supervised(tc: tinker.TrainingClient, tokenizer: Any, steps: int, lr: float) -> list[float]:
    data = [sft_datum(tokenizer, q, a) for q, a in SFT_EXAMPLES]
    n_tokens = sum(sum(d.loss_fn_inputs["weights"].data) for d in data)
    losses = []
    for step in range(1, steps + 1):
        started = time.monotonic()
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=lr))
        loss = fb.result().metrics["loss:sum"] / n_tokens
        opt.result()
        losses.append(loss)
        progress("sft", step, steps, loss=loss, time=f"{time.monotonic() - started:.1f}s")
    return losses


def rl_step(tc: tinker.TrainingClient, tokenizer: Any, rng: random.Random, *, groups: int, group_size: int,
            lr: float) -> tuple[float, float | None, str]:
    """One on-policy step: sample `group_size` answers per problem from the current weights, reward the
    right ones, center rewards per group, one importance_sampling forward_backward + optim_step."""
    sampler = tc.save_weights_and_get_sampling_client().result()
    problems = [(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(groups)]
    params = types.SamplingParams(max_tokens=6, temperature=1.0, stop=[tokenizer.eos_token_id])
    prompts = [chat_prompt(tokenizer, f"What is {a} + {b}? Answer with just the number.") for a, b in problems]
    futures = [sampler.sample(types.ModelInput.from_ints(p), group_size, params) for p in prompts]
    data, rewards, example = [], [], ""
    for (a, b), prompt, future in zip(problems, prompts, futures, strict=True):
        seqs = future.result().sequences
        texts = [tokenizer.decode(s.tokens, skip_special_tokens=True).strip() for s in seqs]
        example = example or f"{a} + {b} -> {texts[0]!r}"
        group = [1.0 if first_int(text) == a + b else 0.0 for text in texts]
        rewards += group
        mean = sum(group) / len(group)
        data += [rl_datum(prompt, s, r - mean) for s, r in zip(seqs, group, strict=True) if r != mean]
    if not data:  # every group all right or all wrong: no signal this step
        return sum(rewards) / len(rewards), None, example
    fb = tc.forward_backward(data, "importance_sampling")
    opt = tc.optim_step(types.AdamParams(learning_rate=lr))
    loss = fb.result().metrics["loss:sum"] / len(data)
    opt.result()
    return sum(rewards) / len(rewards), loss, example


def reinforce(tc: tinker.TrainingClient, tokenizer: Any, steps: int, lr: float, seed: int) -> None:
    rng = random.Random(seed)
    for step in range(1, steps + 1):
        started = time.monotonic()
        reward, loss, example = rl_step(tc, tokenizer, rng, groups=2, group_size=4, lr=lr)
        shown = {"reward": reward, "loss": loss if loss is not None else "skipped (no signal)"}
        progress("rl", step, steps, **shown, time=f"{time.monotonic() - started:.1f}s", sample=example)


def run(args: argparse.Namespace, gw: Gateway) -> None:
    service = tinker.ServiceClient(base_url=gw.url, api_key=gw.api_key)
    status = "errored"
    try:
        started = time.monotonic()
        print(f"creating a LoRA training client on {args.model} (starts its trainer) ...", flush=True)
        tc = service.create_lora_training_client(base_model=args.model, rank=args.lora_rank, seed=args.seed).result()
        tokenizer = tc.get_tokenizer()
        print(f"training client {tc.model_id} ready in {time.monotonic() - started:.1f} s", flush=True)
        before = sample_text(tc.save_weights_and_get_sampling_client().result(), tokenizer, PROBE_PROMPT, 24)
        print(f"before training: {PROBE_PROMPT!r} -> {before!r}", flush=True)
        losses = supervised(tc, tokenizer, args.sft_steps, args.sft_lr)
        after = sample_text(tc.save_weights_and_get_sampling_client().result(), tokenizer, PROBE_PROMPT, 24)
        print(f"after training:  {PROBE_PROMPT!r} -> {after!r}", flush=True)
        if len(losses) > 1:
            print(f"supervised loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
        reinforce(tc, tokenizer, args.rl_steps, args.rl_lr, args.seed)
        status = "success"
    finally:
        with contextlib.suppress(Exception):
            service.close(status).result(timeout=30)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tinkerkube_gateway.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"base model (default {DEFAULT_MODEL})")
    p.add_argument("--sft-steps", type=int, default=5, help="supervised steps")
    p.add_argument("--rl-steps", type=int, default=3, help="RL steps")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--sft-lr", type=float, default=2e-3)
    p.add_argument("--rl-lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None,
                   help="key for the gateway TINKER_BASE_URL names (default: TINKER_API_KEY)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The SDK warns on every `try_again` (an op still running after a 30 s long-poll): expected on a CPU.
    logging.getLogger("tinker.lib.api_future_impl").setLevel(logging.ERROR)
    started = time.monotonic()
    try:
        with gateway(args.api_key) as gw:
            run(args, gw)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        return 130
    print(f"demo finished in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
