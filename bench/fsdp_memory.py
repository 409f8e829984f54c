"""Memory per rank and step time of a 2-rank trainer pool whose base is sharded (`sharding: fsdp`)
against the same pool replicating it (`sharding: replicate`), measured in the same run.

Both pools are real torchrun groups (gloo on CPU), started side by side with the same run attached.
Per rank it prints the base parameter bytes the rank holds (the engine's `base model loaded` log
line: local shards under fsdp, the whole base under replicate), its RSS once ready (the base and the
process, before any op), its RSS after the steps and its peak RSS (VmHWM, loading included), then the
ratios fsdp / replicate. Expected: ≈ 1/N = 0.5 for the base parameters; RSS falls by less, because the
process (torch, Python, tokenizer) costs the same in both, and during a pass activations, logits and
the all-gathered layers (the root's embeddings stay gathered from forward to backward) come on top.
Ready RSS flatters `replicate`: transformers maps the safetensors file and a weight's pages count only
once touched (measured: SmolLM2 loaded 557 MiB RSS, 1058 MiB after reading every weight), so compare
RSS after the steps. Both pools run with glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_), so
that freed large blocks go back to the OS and RSS shows live memory rather than the allocator's cache.

Step time: forward_backward + optim_step through the pod API, rounds interleaved between the two pools
so that load from other processes hits both alike; fsdp pays an all-gather per layer per forward (and
again in backward), so expect a ratio above 1 on CPU/gloo. A greedy sample (every rank decodes in
lockstep under fsdp) is timed the same way.

    .venv/bin/python bench/fsdp_memory.py             # SmolLM2-135M, 8 x 128 tokens, 4 measured steps
    .venv/bin/python bench/fsdp_memory.py --quick     # tiny model smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for sub in ("crds", "api_gateway", "operator", "trainer_pod", ""):
    sys.path.insert(0, str(ROOT / sub) if sub else str(ROOT))

import numpy as np  # noqa: E402

from tests.support.fakes import forward_backward_body, json_body  # noqa: E402
from tests.support.trainer_proc import TrainerGroup, start_trainer  # noqa: E402
from tinkerkube_contract import pod_api as api  # noqa: E402
from tinkerkube_contract.env import PREFIX, SHARDING  # noqa: E402
from tinkerkube_contract.models import SMOLLM2_135M, TINY_QWEN3  # noqa: E402
from tinkerkube_contract.pod_api import OpKind  # noqa: E402
from tinkerkube_contract.resource import LoraSpec, TrainingSessionSpec  # noqa: E402

MODES = ("replicate", "fsdp")
STEP = json_body(api.OptimStepOp(adam_params=api.AdamParams(learning_rate=1e-4)))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2_135M)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="datums per forward_backward (split over the ranks)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="measured steps per pool, interleaved")
    p.add_argument("--max-tokens", type=int, default=16, help="greedy sample length")
    p.add_argument("--quick", action="store_true", help="tiny model, short steps")
    p.add_argument("--model-cache", type=Path, default=ROOT / ".cache" / "models")
    args = p.parse_args()
    if args.quick:
        args.model, args.batch, args.seq_len, args.steps, args.max_tokens = TINY_QWEN3, 4, 32, 2, 4
    return args


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def timed(group: TrainerGroup, seq: int, body: bytes) -> float:
    client = group.client(timeout=600)
    try:
        start = time.perf_counter()
        client.run(seq, OpKind.FORWARD_BACKWARD, body, timeout=600)
        client.run(seq + 1, OpKind.OPTIM_STEP, STEP, timeout=600)
        return time.perf_counter() - start
    finally:
        client.close()


def timed_sample(group: TrainerGroup, name: str, prompt: list[int], max_tokens: int) -> float:
    op = api.SampleOp(request={"prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]}, "num_samples": 2,
                               "sampling_params": {"max_tokens": max_tokens, "temperature": 0.0, "stop": []}},
                      model_id=group.model_id)
    client = group.client(timeout=600)
    try:
        start = time.perf_counter()
        client.put_sample(name, json_body(op))
        client.sample_result(name, timeout=600)
        return time.perf_counter() - start
    finally:
        client.close()


def main() -> int:
    args = parse_args()
    rng = np.random.default_rng(0)
    data = [rng.integers(3, 400, size=args.seq_len + 1).tolist() for _ in range(args.batch)]
    body = forward_backward_body(data)
    spec = TrainingSessionSpec(base_model=args.model, model_id="bench-fsdp:train:0", owner="bench",
                               lora=LoraSpec(rank=16, alpha=32, seed=1))
    tmp = Path(tempfile.mkdtemp(prefix="bench-fsdp-"))
    print(f"load: {os.getloadavg()}; model {args.model}; {args.ranks} ranks; batch {args.batch} x {args.seq_len}")
    groups: dict[str, TrainerGroup] = {}
    ready_rss: dict[str, dict[int, int]] = {}
    with contextlib.ExitStack() as stack:
        for mode in MODES:  # one after the other: peak RSS while loading is not inflated by the other's load
            group = start_trainer(spec, checkpoint_dir=tmp / mode / "ckpt", model_cache_dir=args.model_cache,
                                  nproc_per_node=args.ranks, log_dir=tmp / mode / "logs",
                                  extra_env={SHARDING: mode, "OMP_NUM_THREADS": "1",
                                             "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
                                             PREFIX + "COLLECTIVE_TIMEOUT_SECONDS": "1200"})
            stack.callback(group.stop)
            group.wait_ready(600)
            groups[mode] = group
            ready_rss[mode] = {rank: status_kib(pid, "VmRSS") * 1024 for rank, pid in group.worker_pids().items()}
        times: dict[str, list[float]] = {m: [] for m in MODES}
        samples: dict[str, list[float]] = {m: [] for m in MODES}
        seq = 1
        for i in range(args.warmup + args.steps):
            for mode in (MODES if i % 2 == 0 else MODES[::-1]):
                took = timed(groups[mode], seq, body)
                if i >= args.warmup:
                    times[mode].append(took)
            seq += 2
        for i in range(2):
            for mode in MODES:
                samples[mode].append(timed_sample(groups[mode], f"s{i}", data[0][:32], args.max_tokens))
        held: dict[str, dict[int, int]] = {}
        rss: dict[str, dict[int, tuple[int, int]]] = {}
        for mode, group in groups.items():
            held[mode] = {int(e["rank"]): int(e["base_param_bytes"]) for e in group.events("base model loaded")}
            rss[mode] = {rank: (status_kib(pid, "VmRSS") * 1024, status_kib(pid, "VmHWM") * 1024)
                         for rank, pid in group.worker_pids().items()}

    mib = 1 / 2**20
    print(f"{'pool':<10} {'rank':>4} {'base params MiB':>16} {'ready RSS MiB':>14} {'RSS after MiB':>14} "
          f"{'peak RSS MiB':>13}")
    for mode in MODES:
        for rank in sorted(held[mode]):
            print(f"{mode:<10} {rank:>4} {held[mode][rank] * mib:>16.1f} {ready_rss[mode][rank] * mib:>14.1f} "
                  f"{rss[mode][rank][0] * mib:>14.1f} {rss[mode][rank][1] * mib:>13.1f}")

    def mean(mode: str, what: int | None) -> float:
        ranks = sorted(held[mode])
        if what is None:
            return float(np.mean([held[mode][r] for r in ranks]))
        return float(np.mean([rss[mode][r][what] for r in ranks]))

    print(f"base params per rank, fsdp / replicate: {mean('fsdp', None) / mean('replicate', None):.3f} "
          f"(1/N = {1 / args.ranks:.3f})")
    ready = {m: float(np.mean(list(ready_rss[m].values()))) for m in MODES}
    print(f"ready RSS per rank, fsdp / replicate:   {ready['fsdp'] / ready['replicate']:.3f} "
          "(replicate's mmapped weights are not all paged in yet: see the docstring)")
    print(f"RSS after steps, fsdp / replicate:      {mean('fsdp', 0) / mean('replicate', 0):.3f}")
    print(f"peak RSS per rank, fsdp / replicate:    {mean('fsdp', 1) / mean('replicate', 1):.3f}")
    step = {m: float(np.median(times[m])) for m in MODES}
    print(f"step time (fb + optim, median of {args.steps}): replicate {step['replicate']:.3f}s, fsdp "
          f"{step['fsdp']:.3f}s, fsdp / replicate: {step['fsdp'] / step['replicate']:.2f}")
    sample = {m: float(np.median(samples[m])) for m in MODES}
    print(f"greedy sample ({args.max_tokens} tokens x 2): replicate {sample['replicate']:.3f}s, fsdp "
          f"{sample['fsdp']:.3f}s, fsdp / replicate: {sample['fsdp'] / sample['replicate']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
