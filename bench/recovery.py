"""Bounded recovery: how long a run takes to come back after its pool is killed, early vs late in training.

    .venv/bin/python bench/recovery.py                                      # tiny model, 10 vs 200 steps
    .venv/bin/python bench/recovery.py --model HuggingFaceTB/SmolLM2-135M-Instruct --late 60

Through the real SDK against a local-mode gateway (real trainer pools): a run trains `--early` SFT steps,
its pool's ranks are SIGKILLed, and the next step is timed from submit to result; that time covers
starting the pool again, attaching the run from its newest durable checkpoint and replaying the ops
after it from the gateway's op log. The same for a second run after `--late` steps. Automatic
checkpoints (every `--every` optim_steps) bound what is replayed, so the late recovery must not cost
much more than the early one. goal: late / early <= 1.5. (That the math after a recovery equals an
uninterrupted twin's is what tests/faults checks.)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _src in ("crds", "api_gateway", "trainer_pod", "."):
    if str(REPO / _src) not in sys.path:
        sys.path.insert(0, str(REPO / _src))

import tinker  # noqa: E402
from tinker import types  # noqa: E402

from tests.support.sdk import GatewayProc, start_gateway  # noqa: E402
from tinkerkube_contract.models import TINY_QWEN3  # noqa: E402

KEYS = {"tml-early": "early", "tml-late": "late"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=TINY_QWEN3)
    p.add_argument("--early", type=int, default=10)
    p.add_argument("--late", type=int, default=200)
    p.add_argument("--every", type=int, default=20, help="automatic checkpoint interval (optim_steps)")
    p.add_argument("--model-cache", type=Path, default=REPO / ".cache" / "models")
    return p.parse_args(argv)


def batch(step: int) -> list[types.Datum]:
    out = []
    for i in range(4):
        tokens = [(step * 37 + i * 11 + j * 5) % 350 + 3 for j in range(17)]
        out.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                               loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 16}))
    return out


def sft_step(client: tinker.TrainingClient, step: int) -> float:
    fb = client.forward_backward(batch(step), "cross_entropy")
    opt = client.optim_step(types.AdamParams(learning_rate=1e-3))
    loss = fb.result().metrics["loss:sum"]
    opt.result()
    return float(loss)


def kill_pool(gw: GatewayProc, model_id: str) -> None:
    logs = gw.state_dir / "logs"
    for state in logs.glob("*.pool.json"):
        if model_id in json.loads(state.read_text())["runs"]:
            log = (logs / state.name.replace(".pool.json", ".log")).read_text().splitlines()
            for line in log:
                if line.startswith("{") and '"rank started"' in line:
                    os.kill(json.loads(line)["pid"], signal.SIGKILL)
            return
    raise RuntimeError(f"no pool serves {model_id}")


def recovery(gw: GatewayProc, key: str, model: str, steps: int) -> tuple[float, float]:
    """Seconds of the first step after the kill, and that step's loss."""
    client = tinker.ServiceClient(base_url=gw.url, api_key=key).create_lora_training_client(
        base_model=model, rank=8, seed=3).result()
    for step in range(steps):
        sft_step(client, step)
    kill_pool(gw, client.model_id)
    started = time.perf_counter()
    loss = sft_step(client, steps)
    return time.perf_counter() - started, loss


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = {"TINKERKUBE_GATEWAY_API_KEYS": json.dumps(KEYS),
           "TINKERKUBE_GATEWAY_TRAINER_AUTO_CHECKPOINT_STEPS": str(args.every)}
    with tempfile.TemporaryDirectory(prefix="tinkerkube-bench-recovery-") as tmp:
        gw = start_gateway(Path(tmp) / "state", model_cache_dir=args.model_cache, real_trainer=True, extra_env=env)
        try:
            early, early_loss = recovery(gw, "tml-early", args.model, args.early)
            late, late_loss = recovery(gw, "tml-late", args.model, args.late)
        finally:
            gw.stop()
    print(f"model {args.model}, automatic checkpoints every {args.every} optim_steps")
    print(f"recovery after {args.early} steps: {early:.2f} s (step loss {early_loss:.4f}); after {args.late} steps: "
          f"{late:.2f} s (step loss {late_loss:.4f})")
    ratio = late / early
    print(f"late / early = {ratio:.3f}   goal <= 1.5: {'MET' if ratio <= 1.5 else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
