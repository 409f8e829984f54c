"""Per-op overhead: small SFT steps and tiny ops through the SDK vs a bare in-process loop, hop by hop.

    .venv/bin/python bench/op_overhead.py            # tiny Qwen3 (hidden 64, 2 layers), LoRA r=32, 8 x 128
    .venv/bin/python bench/op_overhead.py --quick    # smoke run

All in ONE run on this machine, the paths interleaved round by round (load from other processes hits all):
(a) SFT tokens/s (forward_backward(cross_entropy) + optim_step on 8 x 128 tokens): the real `tinker` SDK through
    a local-mode gateway, (1) one step at a time (submit both, wait both, next) and (2) every step submitted at
    once, then waited; over a bare in-process transformers + peft loop with the same model, LoRA and batch.
    goals: sequential >= 0.85x bare, submitted at once >= 0.95x bare.
(b) `forward` of 1 datum x 8 tokens: p50/p99 latency through the SDK. goal: p50 <= 8 ms. With the per-hop
    breakdown of the same op, each layer measured by driving it directly: the model's compute (the trainer's
    own run time for the op), the trainer's HTTP + queue (its internal API driven directly, minus compute), the
    gateway (the Tinker wire protocol by hand through the gateway, minus the trainer's API), and the SDK's
    client side (the SDK minus the wire protocol by hand).
(c) CPU milliseconds each process spent per SDK `forward` (gateway, trainer ranks, the SDK's own process): unlike
    wall-clock latency this barely moves with the machine's load, so it shows where an op's work goes even on a
    shared machine.
(d) The SDK's floor: `forward` p50 through the same SDK against a server that answers from memory
    (bench/_sdk_floor.py: no store, no trainer, no framework), and with the model's compute added (the in-trainer
    run time of (b)): the least any server could answer in on this machine, against the 8 ms goal.
(e) The pool engine in this process (no HTTP, no threads, no other process): the same 8 x 128 step through
    `PoolEngine.run_pass` (prepare + forward_backward, prepare + optim_step) over the bare loop, interleaved with
    it: the part of the gap that is the trainer's own math (collation, routed LoRA, per-token outputs, checks).
(f) The ideal server: (a) and (b) through the same SDK against bench/_sdk_floor.py --compute, a raw ASGI server
    that runs each op's bare math (the bare loop of (a), split into its ops) on one thread and answers with a
    recorded result: nothing but the math and one hand-off. Its ratios are the ceiling any server reaches with
    this SDK on this machine (the SDK's CPU shares the cores with the math); a goal above them is out of reach
    here, whatever the server does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _src in ("crds", "api_gateway", "trainer_pod", ".", "bench"):
    if str(REPO / _src) not in sys.path:
        sys.path.insert(0, str(REPO / _src))

import httpx  # noqa: E402
import psutil  # noqa: E402
from gateway_overhead import (  # noqa: E402  (the same paths the gateway benchmark drives)
    ADAM,
    API_KEY,
    BarePeft,
    DirectTrainer,
    RawGateway,
    SdkPath,
    fb_body,
    make_batch,
    pct,
)
from tinker import types  # noqa: E402

from tests.support.sdk import free_port, start_gateway  # noqa: E402
from tinkerkube_contract import pod_api  # noqa: E402
from tinkerkube_contract.models import TINY_QWEN3  # noqa: E402
from tinkerkube_contract.resource import LoraSpec  # noqa: E402

GOALS = {"sequential": 0.85, "submitted": 0.95, "forward_p50_ms": 8.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=TINY_QWEN3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="SFT steps per path per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--latency-ops", type=int, default=60, help="forward calls per path per round")
    p.add_argument("--threads", type=int, default=1, help="torch threads for every path (trainers and bare)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model-cache", type=Path, default=REPO / ".cache" / "models")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.latency_ops = 3, 1, 10
    return args


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def all_at_once(client: SdkPath, data: list[types.Datum], steps: int) -> None:
    futures = []
    for _ in range(steps):
        futures.append(client.client.forward_backward(data, "cross_entropy"))
        futures.append(client.client.optim_step(ADAM))
    for f in futures:
        f.result()


class CpuMeter:
    """CPU seconds (user + system) that processes spend while `measure` runs, summed over calls."""

    def __init__(self, processes: dict[str, psutil.Process]) -> None:
        self.processes = processes
        self.spent = dict.fromkeys(processes, 0.0)
        self.calls = 0

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        t = proc.cpu_times()
        return t.user + t.system

    def measure(self, call: Callable[[], object]) -> None:
        before = {k: self._cpu(p) for k, p in self.processes.items()}
        call()
        for k, p in self.processes.items():
            self.spent[k] += self._cpu(p) - before[k]
        self.calls += 1

    def per_call_ms(self) -> dict[str, float]:
        return {k: 1000 * v / max(1, self.calls) for k, v in self.spent.items()}


def gateway_processes(gateway_pid: int) -> dict[str, psutil.Process]:
    """The gateway, its trainer ranks (torchrun's workers, without the launcher, which only waits) and us."""
    gateway = psutil.Process(gateway_pid)
    ranks = [c for c in gateway.children(recursive=True) if "torch.distributed.run" not in " ".join(c.cmdline())]
    return {"gateway": gateway, **{f"trainer rank {i}": r for i, r in enumerate(ranks)}, "SDK client": psutil.Process()}


class Forward:
    """One `forward` of 1 x 8 tokens on each path; the direct path also reads the trainer's own run time."""

    def __init__(self, sdk: SdkPath, raw: RawGateway, direct: DirectTrainer) -> None:
        self.sdk, self.raw, self.direct = sdk, raw, direct
        self.datum = make_batch(400, 1, 8, seed=5)
        self.compute: list[float] = []

    def via_sdk(self) -> None:
        self.sdk.client.forward(self.datum, "cross_entropy").result()

    def body(self, model_id: str, seq_id: int) -> bytes:
        """What the SDK sends for `forward`: a forward_backward request marked forward_only."""
        from tinker.proto.request_conv import forward_backward_request_to_proto

        request = types.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, forward_backward_input=
                                               types.ForwardBackwardInput(data=self.datum, loss_fn="cross_entropy"))
        msg = forward_backward_request_to_proto(request)
        msg.forward_only = True
        return msg.SerializeToString()

    def via_raw(self) -> None:
        r = self.raw.http.post(self.raw.base + "/api/v1/forward_backward",
                               content=self.body(self.sdk.model_id, self.sdk.reserve_seq()),
                               headers={"Content-Type": "application/x-protobuf"})
        r.raise_for_status()
        self.raw._retrieve(r.json()["request_id"], proto=True)

    def via_direct(self) -> None:
        d = self.direct
        d.seq += 1
        d._put(d.seq, pod_api.OpKind.FORWARD_BACKWARD, self.body(d.model_id, d.seq), pod_api.CONTENT_PROTOBUF)
        timing = pod_api.OpTiming.parse(d._get(d.seq).headers.get(pod_api.HEADER_OP_TIMING))
        if timing is not None:
            self.compute.append(timing.run_s)


class Floor:
    """bench/_sdk_floor.py in a process of its own in front of the gateway, and an SDK client made through it;
    `compute` (the model's directory): the ideal server, which runs each op's bare math before answering."""

    def __init__(self, gateway_url: str, model: str, lora: LoraSpec, compute: Path | None = None,
                 shape: tuple[int, int] = (8, 128), threads: int = 1) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, str(REPO / "bench" / "_sdk_floor.py"), "--serve", str(port), "--upstream",
                   gateway_url]
        if compute is not None:
            command += ["--compute", str(compute), "--rank", str(lora.rank), "--fb-shape", f"{shape[0]}x{shape[1]}",
                        "--threads", str(threads)]
        self.proc = subprocess.Popen(command)
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(self.url + "/__floor", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the floor server did not start") from None
                time.sleep(0.2)
        self.sdk = SdkPath(self.url, model, lora)
        self.datum = make_batch(400, 1, 8, seed=5)

    def forward(self) -> None:
        self.sdk.client.forward(self.datum, "cross_entropy").result()

    def warm(self, data: list[types.Datum] | None = None) -> None:
        """Until this server takes forwards (and with `data`, SFT steps) itself: the first ones pass through to
        the gateway, which answers them for real."""
        wanted = {"forward"} | ({"forward_backward", "optim_step"} if data is not None else set())
        for _ in range(20):
            self.forward()
            if data is not None:
                self.sdk.step(data)
            if wanted <= set(httpx.get(self.url + "/__floor").json()["recorded"]):
                return
        raise RuntimeError(f"the floor server never recorded finished results of {sorted(wanted)}")

    def stop(self) -> None:
        self.sdk.close()
        self.proc.terminate()
        self.proc.wait(10)


class EnginePath:
    """(e) The pool engine a trainer runs, built in this process, with one run attached, fed the same bytes."""

    MODEL_ID = "bench-engine:train:0"

    def __init__(self, model: str, lora: LoraSpec, cache_dir: Path, state_dir: Path) -> None:
        from tinkerkube_contract.pod_api import RunSpec
        from tinkerkube_contract.resource import SessionMode
        from tinkerkube_trainer.engine import build_engine
        from tinkerkube_trainer.engine_api import LocalCollective, PoolConfig

        self.pool = build_engine(PoolConfig(base_model=model, checkpoint_dir=state_dir, model_cache_dir=cache_dir,
                                            device="cpu"), LocalCollective())
        self._run(self.pool.prepare_attach(RunSpec(model_id=self.MODEL_ID, base_model=model,
                                                   mode=SessionMode.TRAIN, lora=lora)))
        self.optim = pod_api.OptimStepOp(adam_params=pod_api.AdamParams(**ADAM.model_dump())).model_dump_json().encode()
        self.seq = 0

    def _run(self, op: object) -> None:
        from tinkerkube_trainer.engine_api import OpError

        outcome = self.pool.run_pass([op])[0]
        if isinstance(outcome, OpError):
            raise RuntimeError(f"the in-process engine refused a bench op: {outcome.message}")

    def step(self, data: list[types.Datum]) -> None:
        self.seq += 2
        self._run(self.pool.prepare(self.MODEL_ID, pod_api.OpKind.FORWARD_BACKWARD,
                                    fb_body(self.MODEL_ID, self.seq - 1, data), pod_api.CONTENT_PROTOBUF))
        self._run(self.pool.prepare(self.MODEL_ID, pod_api.OpKind.OPTIM_STEP, self.optim, pod_api.CONTENT_JSON))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # trainers started below inherit it
    import torch

    torch.set_num_threads(args.threads)
    lora = LoraSpec(rank=args.rank, alpha=float(args.rank))
    data = make_batch(400, args.batch, args.seq_len, seed=1)
    tokens = args.batch * args.seq_len * args.steps
    with tempfile.TemporaryDirectory(prefix="tinkerkube-bench-ops-") as tmp:
        state = Path(tmp)
        gw = start_gateway(state / "gw", model_cache_dir=args.model_cache, real_trainer=True,
                           extra_env={"TINKERKUBE_GATEWAY_API_KEYS": f'{{"{API_KEY}": "bench"}}'})
        direct = DirectTrainer(args.model, lora, args.model_cache, state / "direct")
        try:
            direct.start(300)
            sdk = SdkPath(gw.url, args.model, lora)
            raw = RawGateway(gw.url, sdk)
            from tinkerkube_trainer.model_loading import model_location

            bare = BarePeft(Path(model_location(args.model, aliases=None, cache_dir=args.model_cache)), lora)
            batch = bare.tensors(data)
            engine = EnginePath(args.model, lora, args.model_cache, state / "engine")
            fwd = Forward(sdk, raw, direct)
            floor = Floor(gw.url, args.model, lora)
            floor.warm()
            ideal = Floor(gw.url, args.model, lora, compute=bare.model_dir, shape=(args.batch, args.seq_len),
                          threads=args.threads)
            ideal.warm(data)
            cpu = CpuMeter(gateway_processes(gw.proc.pid))
            for warm in (lambda: sdk.step(data), lambda: direct.step(data), lambda: bare.step(batch),
                         lambda: engine.step(data), fwd.via_sdk, fwd.via_raw, fwd.via_direct):
                warm()
            times: dict[str, list[float]] = {"bare": [], "sequential": [], "submitted": [], "engine": [],
                                             "ideal sequential": [], "ideal submitted": []}
            lat: dict[str, list[float]] = {"sdk": [], "raw": [], "direct": [], "floor": [], "ideal": []}
            for r in range(args.rounds):
                times["bare"].append(timed(lambda: [bare.step(batch) for _ in range(args.steps)]))
                times["engine"].append(timed(lambda: [engine.step(data) for _ in range(args.steps)]))
                times["sequential"].append(timed(lambda: [sdk.step(data) for _ in range(args.steps)]))
                times["submitted"].append(timed(lambda: all_at_once(sdk, data, args.steps)))
                times["ideal sequential"].append(timed(lambda: [ideal.sdk.step(data) for _ in range(args.steps)]))
                times["ideal submitted"].append(timed(lambda: all_at_once(ideal.sdk, data, args.steps)))
                for _ in range(args.latency_ops):
                    lat["sdk"].append(timed(fwd.via_sdk))
                    lat["raw"].append(timed(fwd.via_raw))
                    lat["direct"].append(timed(fwd.via_direct))
                    lat["floor"].append(timed(floor.forward))
                    lat["ideal"].append(timed(ideal.forward))
                    cpu.measure(fwd.via_sdk)
                print(f"round {r + 1}/{args.rounds} done", flush=True)
            report(args, tokens, times, lat, fwd.compute, cpu.per_call_ms())
            floor.stop()
            ideal.stop()
            sdk.close()
        finally:
            direct.stop()
            gw.stop()
    return 0


def report(args: argparse.Namespace, tokens: int, times: dict[str, list[float]], lat: dict[str, list[float]],
           compute: list[float], cpu_ms: dict[str, float]) -> None:
    rate = {k: tokens * len(v) / sum(v) for k, v in times.items()}
    print(f"model {args.model}, LoRA r={args.rank}, {args.batch} x {args.seq_len} tokens a step, "
          f"{args.threads} thread(s), {args.rounds} rounds")
    print(f"(a) SFT tokens/s: bare {rate['bare']:.0f}; SDK one step at a time {rate['sequential']:.0f} "
          f"({rate['sequential'] / rate['bare']:.3f}x, goal >= {GOALS['sequential']}: "
          f"{'MET' if rate['sequential'] / rate['bare'] >= GOALS['sequential'] else 'NOT MET'}); "
          f"all submitted at once {rate['submitted']:.0f} ({rate['submitted'] / rate['bare']:.3f}x, goal >= "
          f"{GOALS['submitted']}: {'MET' if rate['submitted'] / rate['bare'] >= GOALS['submitted'] else 'NOT MET'})")
    ms = {k: 1000 * statistics.median(v) for k, v in lat.items()}
    p99 = 1000 * pct(lat["sdk"], 99)
    run = 1000 * statistics.median(compute) if compute else float("nan")
    print(f"(b) forward 1 x 8 through the SDK: p50 {ms['sdk']:.2f} ms, p99 {p99:.2f} ms (goal p50 <= "
          f"{GOALS['forward_p50_ms']}: {'MET' if ms['sdk'] <= GOALS['forward_p50_ms'] else 'NOT MET'})")
    print(f"    per hop (p50s): compute {run:.2f} ms | trainer HTTP + queue {ms['direct'] - run:.2f} ms | "
          f"gateway {ms['raw'] - ms['direct']:.2f} ms | SDK client side {ms['sdk'] - ms['raw']:.2f} ms  "
          f"(wire by hand through the gateway {ms['raw']:.2f} ms, trainer API direct {ms['direct']:.2f} ms)")

    print("(c) CPU per SDK forward: " + " | ".join(f"{k} {v:.2f} ms" for k, v in cpu_ms.items())
          + f" (load average {os.getloadavg()[0]:.1f})")
    print(f"(d) SDK floor: forward p50 {ms['floor']:.2f} ms against a server answering from memory; + the model's "
          f"compute {run:.2f} ms = {ms['floor'] + run:.2f} ms, the least any server could answer in here "
          f"(goal {GOALS['forward_p50_ms']}); this server's share above that floor: "
          f"{ms['sdk'] - ms['floor'] - run:.2f} ms")
    print(f"(e) the pool engine in this process: {rate['engine']:.0f} tokens/s ({rate['engine'] / rate['bare']:.3f}x "
          f"the bare loop): the trainer's own math, before any hop")
    ideal = {"sequential": rate["ideal sequential"] / rate["bare"], "submitted": rate["ideal submitted"] / rate["bare"]}
    reach = {k: "within reach" if v >= GOALS[k] else "OUT OF REACH here" for k, v in ideal.items()}
    forward_reach = "within reach" if ms["ideal"] <= GOALS["forward_p50_ms"] else "OUT OF REACH here"
    print(f"(f) the ideal server (the bare math on one thread behind a raw ASGI app, same SDK): one step at a time "
          f"{ideal['sequential']:.3f}x (goal {GOALS['sequential']}: {reach['sequential']}), all submitted at once "
          f"{ideal['submitted']:.3f}x (goal {GOALS['submitted']}: {reach['submitted']}), forward p50 "
          f"{ms['ideal']:.2f} ms (goal {GOALS['forward_p50_ms']}: {forward_reach}); this server reaches "
          f"{rate['sequential'] / rate['ideal sequential']:.3f}x / {rate['submitted'] / rate['ideal submitted']:.3f}x "
          f"of its rates and adds {ms['sdk'] - ms['ideal']:.2f} ms to its forward")


if __name__ == "__main__":
    sys.exit(main())
