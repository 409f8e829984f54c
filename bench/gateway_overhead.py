"""What the gateway costs: SDK-driven SFT steps through it vs the trainer's internal API vs a bare peft loop.

    .venv/bin/python bench/gateway_overhead.py                                  # SmolLM2-135M, batch 8x128
    .venv/bin/python bench/gateway_overhead.py --model tinkerkube/tiny-qwen3 --quick   # smoke run

All figures come from ONE run, measured on the same machine at the same time, with the paths interleaved
round by round so that load from other processes hits every path alike:

(a) throughput of SFT steps (forward_backward(cross_entropy) + optim_step, submitted back to back like the
    cookbook does, then both awaited) on the same batch and LoRA config, three ways:
      gateway: the real `tinker` SDK -> local-mode gateway -> its trainer process
      direct:  raw PUT/GET of the same protobuf/JSON bodies to a second trainer's internal API
               (tinkerkube_contract.pod_api), started by the gateway's own LocalBackend
      bare:    an in-process transformers + peft loop (no HTTP, no queue) with the trainer's LoRA config
    goals: gateway/direct >= 0.95, gateway/bare >= 0.90. Every path does its math with the same torch threads
    (`--threads`, default what a local pool's rank gets here: all cores but one, left to the gateway).
(b) added latency per op: p50/p99 of one small forward_backward and one optim_step, three ways: the SDK
    through the gateway, the wire protocol by hand through the gateway (raw-gw), and the trainer's API by
    hand (direct). What the gateway adds is raw-gw minus direct (same client library, same bodies), taken
    per round (the paths run back to back in each round) so that drifting machine load cancels; the SDK's
    own client-side cost, gateway(SDK) minus raw-gw, is printed beside it.
    goal: added p50 <= 5 ms.
(c) 1,000 concurrent `retrieve_future` long-polls (raw httpx, from a separate process) on futures held
    pending behind a seq gap, while session heartbeat latency is measured. goal: heartbeat p50 <= 10 ms.

Loopback only; every loop is bounded; every process started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing as mp
import os
import shlex
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _src in ("crds", "api_gateway", "trainer_pod", "."):
    if str(REPO / _src) not in sys.path:
        sys.path.insert(0, str(REPO / _src))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import tinker  # noqa: E402
from tinker import types  # noqa: E402
from tinker.proto.request_conv import forward_backward_request_to_proto  # noqa: E402
from tinker.proto.response_conv import deserialize_forward_backward_output  # noqa: E402

from tests.support.sdk import GatewayProc, start_gateway  # noqa: E402
from tests.support.trainer_proc import TrainerGroup, start_trainer  # noqa: E402
from tinkerkube_contract import pod_api  # noqa: E402
from tinkerkube_contract.models import SMOLLM2_135M, TINY_QWEN3  # noqa: E402
from tinkerkube_contract.resource import LoraSpec, TrainingSessionSpec  # noqa: E402

API_KEY = "tml-bench"
ADAM = types.AdamParams(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-8)
GOALS = {"gateway/direct": 0.95, "gateway/bare": 0.90, "added_p50_ms": 5.0, "heartbeat_p50_ms": 10.0}


# ---------------------------------------------------------------------------------------------- inputs


def make_batch(vocab: int, batch: int, seq_len: int, seed: int) -> list[types.Datum]:
    """`batch` datums of `seq_len` random tokens each: input = tokens[:-1], target = tokens[1:], all weighted."""
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(batch):
        tokens = rng.integers(10, vocab - 10, size=seq_len + 1).tolist()
        data.append(types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": np.asarray(tokens[1:], dtype=np.int64),
                            "weights": np.ones(seq_len, dtype=np.float32)}))
    return data


def fb_body(model_id: str, seq_id: int, data: list[types.Datum]) -> bytes:
    """Exactly what the SDK puts on the wire for forward_backward (and what the gateway forwards)."""
    request = types.ForwardBackwardRequest(
        model_id=model_id, seq_id=seq_id,
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy"))
    return forward_backward_request_to_proto(request).SerializeToString()


def optim_json(model_id: str, seq_id: int) -> dict[str, object]:
    return {"model_id": model_id, "seq_id": seq_id, "type": "optim_step",
            "adam_params": ADAM.model_dump(mode="json")}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


# ---------------------------------------------------------------------------------------------- paths


class DirectTrainer:
    """A trainer process of its own (tests/support/trainer_proc: the launchers' argv + env), driven over pod_api."""

    def __init__(self, model: str, lora: LoraSpec, cache_dir: Path, state_dir: Path, token: str = "bench-token"):
        self.model_id = "bench-direct:train:0"
        self._spec = TrainingSessionSpec(base_model=model, lora=lora, model_id=self.model_id, owner="bench")
        self._cache_dir, self._state_dir, self._token = cache_dir, state_dir, token
        self._group: TrainerGroup | None = None
        self.url = ""
        self.http = httpx.Client(timeout=httpx.Timeout(120.0, connect=5.0))
        self.seq = 0

    def start(self, timeout: float) -> None:
        self._group = start_trainer(self._spec, checkpoint_dir=self._state_dir / "checkpoints",
                                    model_cache_dir=self._cache_dir, token=self._token, log_dir=self._state_dir)
        self._group.wait_ready(timeout)
        self.url = self._group.url

    def stop(self) -> None:
        self.http.close()
        if self._group is not None:
            self._group.stop()

    def _put(self, seq: int, kind: str, body: bytes, content_type: str) -> None:
        r = self.http.put(self.url + pod_api.op_path(self.model_id, seq), content=body, headers={
            pod_api.HEADER_OP: kind, "Content-Type": content_type, pod_api.HEADER_TOKEN: self._token})
        r.raise_for_status()

    def _get(self, seq: int) -> httpx.Response:
        while True:  # bounded by the trainer's own max wait per call and the op finishing
            r = self.http.get(self.url + pod_api.op_path(self.model_id, seq), params={"wait": 30},
                              headers={pod_api.HEADER_TOKEN: self._token})
            if r.headers.get(pod_api.HEADER_OP_STATE) != pod_api.OpState.PENDING:
                if r.headers.get(pod_api.HEADER_OP_STATE) == pod_api.OpState.FAILED or r.status_code >= 400:
                    raise RuntimeError(f"direct op {seq} failed: {r.status_code} {r.text[:300]}")
                return r

    def submit_fb(self, data: list[types.Datum]) -> int:
        self.seq += 1
        self._put(self.seq, pod_api.OpKind.FORWARD_BACKWARD, fb_body(self.model_id, self.seq, data),
                  pod_api.CONTENT_PROTOBUF)
        return self.seq

    def submit_optim(self) -> int:
        self.seq += 1
        body = pod_api.OptimStepOp(adam_params=pod_api.AdamParams(**ADAM.model_dump())).model_dump_json()
        self._put(self.seq, pod_api.OpKind.OPTIM_STEP, body.encode(), pod_api.CONTENT_JSON)
        return self.seq

    def step(self, data: list[types.Datum]) -> float:
        fb, opt = self.submit_fb(data), self.submit_optim()
        out = deserialize_forward_backward_output(self._get(fb).content)
        self._get(opt)
        return float(out.metrics["loss:sum"])

    def fb(self, data: list[types.Datum]) -> None:
        self._get(self.submit_fb(data))

    def optim(self) -> None:
        self._get(self.submit_optim())


class BarePeft:
    """The floor: the same model + LoRA adapter + AdamW, one padded forward/backward per step, in process."""

    def __init__(self, model_dir: Path, lora: LoraSpec):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from tinkerkube_trainer.lora import target_modules

        self.torch = torch
        self.model_dir = model_dir
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                            target_modules=target_modules(base, lora), task_type="CAUSAL_LM")
        self.model = get_peft_model(base, config)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=ADAM.learning_rate, betas=(ADAM.beta1, ADAM.beta2), eps=ADAM.eps,
                                     weight_decay=0.0)

    def tensors(self, data: list[types.Datum]) -> tuple[object, object, object]:
        torch = self.torch
        inputs = torch.tensor([d.model_input.to_ints() for d in data])
        targets = torch.tensor(np.stack([d.loss_fn_inputs["target_tokens"].to_numpy() for d in data]))
        weights = torch.tensor(np.stack([d.loss_fn_inputs["weights"].to_numpy() for d in data]))
        return inputs, targets, weights

    def logprobs(self, batch: tuple[object, object, object]) -> object:
        inputs, targets, _ = batch
        logits = self.model(input_ids=inputs).logits.float()
        return self.torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def fb(self, batch: tuple[object, object, object]) -> float:
        """forward_backward alone: the gradients accumulate until `optim`."""
        loss = -(self.logprobs(batch) * batch[2]).sum()
        loss.backward()
        return float(loss.detach())

    def optim(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def forward(self, batch: tuple[object, object, object]) -> None:
        """forward alone (no graph), as a forward-only op's per-token logprobs."""
        with self.torch.inference_mode():
            self.logprobs(batch)

    def step(self, batch: tuple[object, object, object]) -> float:
        loss = self.fb(batch)
        self.optim()
        return loss


class SdkPath:
    def __init__(self, base_url: str, model: str, lora: LoraSpec):
        self.service = tinker.ServiceClient(base_url=base_url, api_key=API_KEY)
        self.client = self.service.create_lora_training_client(
            base_model=model, rank=lora.rank, train_mlp=lora.train_mlp, train_attn=lora.train_attn,
            train_unembed=lora.train_unembed).result()
        self.model_id = self.client.model_id

    def step(self, data: list[types.Datum]) -> float:
        fb = self.client.forward_backward(data, "cross_entropy")
        opt = self.client.optim_step(ADAM)
        out = fb.result()
        opt.result()
        return float(out.metrics["loss:sum"])

    def fb(self, data: list[types.Datum]) -> None:
        self.client.forward_backward(data, "cross_entropy").result()

    def optim(self) -> None:
        self.client.optim_step(ADAM).result()

    def reserve_seq(self) -> int:
        """A seq_id from the SDK's own counter, its turn taken, so raw requests sent with it right away keep the
        model's seq order and never collide with the SDK's (private SDK API: bench-only)."""
        request_id = int(self.client._get_request_id())

        async def take_turn() -> None:
            async with self.client._take_turn(request_id):
                pass

        self.client.holder.run_coroutine_threadsafe(take_turn()).result(timeout=60)
        return request_id + 1

    def session_id(self) -> str:
        return str(self.service.holder.get_session_id())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.service.close("success").result(timeout=30)


class RawGateway:
    """The Tinker wire protocol by hand (httpx), on the SDK path's model with seq_ids reserved from the SDK."""

    def __init__(self, base_url: str, sdk: SdkPath):
        self.base, self.sdk = base_url, sdk
        self.http = httpx.Client(timeout=httpx.Timeout(60.0, connect=5.0), headers={"X-API-Key": API_KEY})

    def _retrieve(self, request_id: str, proto: bool) -> httpx.Response:
        accept = "application/x-protobuf" if proto else "application/json"
        for _ in range(100):
            r = self.http.post(self.base + "/api/v1/retrieve_future", headers={"Accept": accept},
                               json={"request_id": request_id, "allow_metadata_only": False}, timeout=45)
            r.raise_for_status()
            if "protobuf" in r.headers.get("content-type", "") or r.json().get("type") != "try_again":
                return r
        raise RuntimeError(f"{request_id} never finished")

    def fb(self, data: list[types.Datum]) -> None:
        seq = self.sdk.reserve_seq()
        r = self.http.post(self.base + "/api/v1/forward_backward", content=fb_body(self.sdk.model_id, seq, data),
                           headers={"Content-Type": "application/x-protobuf"})
        r.raise_for_status()
        self._retrieve(r.json()["request_id"], proto=True)

    def optim(self) -> None:
        r = self.http.post(self.base + "/api/v1/optim_step", json=optim_json(self.sdk.model_id, self.sdk.reserve_seq()))
        r.raise_for_status()
        self._retrieve(r.json()["request_id"], proto=False)


# ---------------------------------------------------------------------------------------------- measurements


def interleaved(paths: dict[str, Callable[[], object]], rounds: int, per_round: int) -> dict[str, list[float]]:
    """Per-call seconds for each path; rounds alternate the order so drift in machine load hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(rounds):
        for name in (list(paths) if r % 2 == 0 else list(reversed(paths))):
            for _ in range(per_round):
                started = time.perf_counter()
                paths[name]()
                times[name].append(time.perf_counter() - started)
    return times


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.lines.append(text)
        print(text, flush=True)

    def check(self, name: str, value: float, goal: float, *, at_least: bool) -> str:
        ok = value >= goal if at_least else value <= goal
        if not ok:
            self.misses.append(f"{name} = {value:.3f} (goal {'>=' if at_least else '<='} {goal})")
        return "ok" if ok else "MISSED"


def throughput(report: Report, steps: dict[str, Callable[[], object]], rounds: int, per_round: int,
               tokens_per_step: int) -> None:
    times = interleaved(steps, rounds, per_round)
    mean = {name: statistics.fmean(t) for name, t in times.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    report.add(f"(a) SFT step throughput: {rounds} rounds x {per_round} steps per path, interleaved")
    for name in steps:
        report.add(f"    {name:<8} {1 / mean[name]:7.3f} steps/s  {tokens_per_step / mean[name]:9.0f} tok/s"
                   f"  (step mean {mean[name] * 1e3:8.1f} ms, median {median[name] * 1e3:8.1f} ms)")
    for base, goal in (("direct", GOALS["gateway/direct"]), ("bare", GOALS["gateway/bare"])):
        ratio = mean[base] / mean["gateway"]
        by_median = median[base] / median["gateway"]
        verdict = report.check(f"gateway/{base} throughput", ratio, goal, at_least=True)
        report.add(f"    gateway/{base:<6} = {ratio:.3f} (by medians {by_median:.3f}); goal >= {goal}: {verdict}")


def latency(report: Report, ops: dict[str, tuple[Callable[[], object], Callable[[], object]]], iters: int) -> None:
    fb_times = interleaved({name: pair[0] for name, pair in ops.items()}, iters, 1)
    opt_times = interleaved({name: pair[1] for name, pair in ops.items()}, iters, 1)
    report.add(f"(b) latency per op, {iters} of each, interleaved (small forward_backward: 1 datum; optim_step)")
    for label, times in (("forward_backward", fb_times), ("optim_step", opt_times)):
        for name, t in times.items():
            report.add(f"    {label:<16} {name:<8} p50 {pct(t, 50) * 1e3:8.2f} ms  p99 {pct(t, 99) * 1e3:8.2f} ms")
        # Paired: each round runs every path back to back, so the per-round difference cancels the load
        # drift that separate p50s carry (several ms on a 200 ms op here).
        paired = [(g - d) * 1e3 for g, d in zip(times["raw-gw"], times["direct"], strict=True)]
        d50, d99 = pct(paired, 50), pct(paired, 99)
        u50 = (pct(times["raw-gw"], 50) - pct(times["direct"], 50)) * 1e3
        verdict = report.check(f"{label} added p50 by the gateway", d50, GOALS["added_p50_ms"], at_least=False)
        report.add(f"    {label:<16} added by the gateway (raw-gw - direct, paired per round) p50 {d50:+8.2f} ms"
                   f"  p99 {d99:+8.2f} ms  (goal p50 <= {GOALS['added_p50_ms']} ms: {verdict}); "
                   f"difference of p50s {u50:+.2f} ms")
        s50 = (pct(times["gateway"], 50) - pct(times["raw-gw"], 50)) * 1e3
        e50 = (pct(times["gateway"], 50) - pct(times["direct"], 50)) * 1e3
        report.add(f"    {label:<16} the SDK's own cost (SDK - raw-gw) p50 {s50:+8.2f} ms; SDK end to end vs direct "
                   f"p50 {e50:+8.2f} ms")


def _waiters_child(base_url: str, model_id: str, seqs: list[int], hold_s: float, ready: object, out: object) -> None:
    """Runs in its own process: submit one optim_step per seq (all stuck behind a seq gap), then keep one
    retrieve_future long-poll open per future for `hold_s` seconds. Reports what the polls returned."""
    async def run() -> dict[str, int]:
        counts = {"submitted": 0, "polls": 0, "try_again": 0, "results": 0, "errors": 0}
        limits = httpx.Limits(max_connections=len(seqs) + 50, max_keepalive_connections=len(seqs) + 50)
        async with httpx.AsyncClient(base_url=base_url, headers={"X-API-Key": API_KEY}, limits=limits,
                                     timeout=httpx.Timeout(60.0, connect=10.0)) as http:
            gate = asyncio.Semaphore(32)

            async def submit(seq: int) -> str:
                async with gate:
                    r = await http.post("/api/v1/optim_step", json=optim_json(model_id, seq))
                    r.raise_for_status()
                    counts["submitted"] += 1
                    return str(r.json()["request_id"])

            request_ids = await asyncio.gather(*(submit(s) for s in seqs))
            deadline = time.monotonic() + hold_s

            async def wait(request_id: str) -> None:
                while time.monotonic() < deadline:
                    try:
                        r = await http.post("/api/v1/retrieve_future", timeout=45,
                                            json={"request_id": request_id, "allow_metadata_only": True})
                        counts["polls"] += 1
                        if r.status_code == 200 and r.json().get("type") == "try_again":
                            counts["try_again"] += 1
                        else:
                            counts["results" if r.status_code == 200 else "errors"] += 1
                            return
                    except httpx.HTTPError:
                        counts["errors"] += 1
                        return

            tasks = [asyncio.create_task(wait(rid)) for rid in request_ids]
            await asyncio.sleep(1.0)  # let every poll reach the server before the parent starts measuring
            ready.set()  # type: ignore[attr-defined]
            await asyncio.wait(tasks, timeout=hold_s + 50)
            for task in tasks:
                task.cancel()
        return counts

    out.put(asyncio.run(run()))  # type: ignore[attr-defined]


def heartbeats(http: httpx.Client, session_id: str, count: int, spacing_s: float) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        r = http.post("/api/v1/session_heartbeat", json={"session_id": session_id, "type": "session_heartbeat"},
                      timeout=10)
        times.append(time.perf_counter() - started)
        r.raise_for_status()
        time.sleep(spacing_s)
    return times


def waiters(report: Report, base_url: str, sdk: SdkPath, n: int, hold_s: float) -> None:
    """Last: the seq gap left here makes the SDK path's model unusable afterwards."""
    session_id = sdk.session_id()
    with httpx.Client(base_url=base_url, headers={"X-API-Key": API_KEY}) as http:
        idle = heartbeats(http, session_id, 40, 0.02)
        sdk.reserve_seq()  # the gap: never sent, so everything after it stays pending
        seqs = [sdk.reserve_seq() for _ in range(n)]
        ctx = mp.get_context("spawn")
        ready, out = ctx.Event(), ctx.Queue()
        child = ctx.Process(target=_waiters_child, args=(base_url, sdk.model_id, seqs, hold_s, ready, out))
        child.start()
        try:
            if not ready.wait(120):
                raise RuntimeError("the waiter process never got its futures submitted")
            loaded = heartbeats(http, session_id, 100, 0.05)
            counts = out.get(timeout=hold_s + 120)
        finally:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
    p50 = pct(loaded, 50) * 1e3
    verdict = report.check("heartbeat p50 under waiters", p50, GOALS["heartbeat_p50_ms"], at_least=False)
    report.add(f"(c) {n} concurrent retrieve_future waiters held {hold_s:.0f} s; waiter process saw {counts}")
    report.add(f"    heartbeat idle   p50 {pct(idle, 50) * 1e3:7.2f} ms  p99 {pct(idle, 99) * 1e3:7.2f} ms")
    report.add(f"    heartbeat loaded p50 {p50:7.2f} ms  p99 {pct(loaded, 99) * 1e3:7.2f} ms"
               f"  (goal p50 <= {GOALS['heartbeat_p50_ms']} ms: {verdict})")


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=SMOLLM2_135M, help=f"built-in model (default {SMOLLM2_135M}; {TINY_QWEN3})")
    p.add_argument("--batch", type=int, default=8, help="datums per SFT step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per datum")
    p.add_argument("--lora-rank", type=int, default=32, help="LoRA rank (the SDK's default is 32)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds for (a)")
    p.add_argument("--steps-per-round", type=int, default=1, help="SFT steps per path per round for (a)")
    p.add_argument("--warmup", type=int, default=1, help="untimed SFT steps per path before (a)")
    p.add_argument("--latency-iters", type=int, default=60, help="ops per path for (b)")
    p.add_argument("--waiters", type=int, default=1000, help="concurrent retrieve_future waiters for (c)")
    p.add_argument("--hold", type=float, default=12.0, help="seconds the waiters are held for (c)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of every path (default: what a local pool's rank gets on this machine, "
                        "one core left to the gateway); the gateway's trainer, the direct one and the bare loop "
                        "must do the math alike for their ratios to measure what lies between them")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer rounds and ops")
    p.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "models")
    args = p.parse_args(argv)
    if args.threads is None:
        from tinkerkube_gateway.backends.local import local_torch_threads

        args.threads = local_torch_threads(os.cpu_count() or 1, 1)
    if args.quick:
        args.rounds, args.steps_per_round, args.warmup, args.latency_iters, args.hold = 2, 2, 2, 15, 5.0
    return args


@contextlib.contextmanager
def started(what: str, start: Callable[[], object], stop: Callable[[], object]) -> Iterator[None]:
    t0 = time.perf_counter()
    start()
    print(f"  {what} ready in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            stop()


def run(args: argparse.Namespace, report: Report) -> None:
    from transformers import AutoTokenizer

    from tinkerkube_trainer.model_store import prepare

    model_dir = prepare(args.model, args.cache_dir)
    vocab = len(AutoTokenizer.from_pretrained(model_dir))
    lora = LoraSpec(rank=args.lora_rank, alpha=float(args.lora_rank))
    batch = make_batch(vocab, args.batch, args.seq_len, seed=0)
    small = make_batch(vocab, 1, 16, seed=1)
    state = Path(tempfile.mkdtemp(prefix="tk-bench-"))
    holder: dict[str, GatewayProc] = {}

    def start_gw() -> None:
        holder["gw"] = start_gateway(state / "gateway", model_cache_dir=args.cache_dir, real_trainer=True,
                                     extra_env={"TINKERKUBE_GATEWAY_API_KEYS": json.dumps({API_KEY: "bench"})})

    direct = DirectTrainer(args.model, lora, args.cache_dir, state / "direct")
    with started("gateway", start_gw, lambda: holder["gw"].stop()), \
            started("direct trainer", lambda: direct.start(300), direct.stop):
        base_url = holder["gw"].url
        t0 = time.perf_counter()
        sdk = SdkPath(base_url, args.model, lora)
        print(f"  SDK training client ({sdk.model_id}) ready in {time.perf_counter() - t0:.1f} s", flush=True)
        bare = BarePeft(model_dir, lora)
        bare_batch = bare.tensors(batch)
        raw = RawGateway(base_url, sdk)
        for _ in range(args.warmup):  # first-step allocations, lazy inits, connection pools
            sdk.step(batch), direct.step(batch), bare.step(bare_batch)
        throughput(report, {"gateway": lambda: sdk.step(batch), "direct": lambda: direct.step(batch),
                            "bare": lambda: bare.step(bare_batch)},
                   args.rounds, args.steps_per_round, args.batch * args.seq_len)
        latency(report, {"gateway": (lambda: sdk.fb(small), sdk.optim), "raw-gw": (lambda: raw.fb(small), raw.optim),
                         "direct": (lambda: direct.fb(small), direct.optim)}, args.latency_iters)
        waiters(report, base_url, sdk, args.waiters, args.hold)
        sdk.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally`s: stop every process started
    logging.getLogger("tinker.lib.api_future_impl").setLevel(logging.ERROR)  # try_again on >30 s ops is expected
    report = Report()
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the gateway's pool and the direct trainer inherit it
    import torch

    torch.set_num_threads(args.threads)  # the bare loop

    report.add(f"# gateway_overhead: {command}")
    report.add(f"# model {args.model}, batch {args.batch}x{args.seq_len}, LoRA rank {args.lora_rank}, "
               f"torch {torch.__version__}, {args.threads} torch thread(s) on every path, "
               f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    run(args, report)
    if report.misses:
        report.add("# goals missed: " + "; ".join(report.misses))
    else:
        report.add("# all goals met")
    print(json.dumps({"command": command, "misses": report.misses}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
