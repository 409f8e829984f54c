"""`make demo` keeps working: demo.py on the tiny model, with very few steps, end to end in a subprocess."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tinkerkube_contract.models import TINY_QWEN3

pytestmark = pytest.mark.slow

STEP_LINE = re.compile(r"^\[(?P<tag>sft|rl)\] \[[#-]+\] (?P<step>\d+)/(?P<total>\d+)  (?P<figures>.*)$")
GATEWAY_LOG = re.compile(r"started a local gateway on http://127\.0\.0\.1:\d+ \(log (?P<log>\S+)\)")


def figures(text: str) -> dict[str, str]:
    """`loss 6.2192  time 0.6s` -> {"loss": "6.2192", "time": "0.6s"}."""
    return dict(part.split(" ", 1) for part in text.split("  ") if " " in part)


def run_demo(tmp_path: Path, model_cache_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINKER_", "TINKERKUBE_"))}
    env.update(TINKERKUBE_GATEWAY_MODEL_CACHE_DIR=str(model_cache_dir), TINKER_TELEMETRY="0", TMPDIR=str(tmp_path),
               HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "tinkerkube_gateway.demo", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_demo_trains_with_sft_then_rl_and_shuts_everything_down(
        tiny_model_dir: Path, model_cache_dir: Path, tmp_path: Path) -> None:
    done = run_demo(tmp_path, model_cache_dir, "--model", TINY_QWEN3, "--sft-steps", "3", "--rl-steps", "2")
    out = done.stdout
    assert done.returncode == 0, f"demo exited {done.returncode}\n{out[-4000:]}\n{done.stderr[-6000:]}"

    steps = [m.groupdict() for line in out.splitlines() if (m := STEP_LINE.match(line))]
    sft = [(int(s["step"]), int(s["total"]), figures(s["figures"])) for s in steps if s["tag"] == "sft"]
    rl = [(int(s["step"]), int(s["total"]), figures(s["figures"])) for s in steps if s["tag"] == "rl"]
    assert [(step, total) for step, total, _ in sft] == [(1, 3), (2, 3), (3, 3)], out
    losses = [float(f["loss"]) for _, _, f in sft]
    assert all(math.isfinite(x) and x > 0 for x in losses), losses
    assert losses[-1] < losses[0], f"supervised loss did not fall on its own training data: {losses}"
    assert [(step, total) for step, total, _ in rl] == [(1, 2), (2, 2)], out
    assert all(0.0 <= float(f["reward"]) <= 1.0 for _, _, f in rl), rl

    assert "before training: 'Who are you?' -> " in out and "after training:  'Who are you?' -> " in out
    assert "gateway stopped" in out and "demo finished in" in out
    started = GATEWAY_LOG.search(out)
    assert started, out
    leftover = list((Path(started["log"]).parent / "logs").glob("*.pid"))
    assert not leftover, f"trainers still registered after the demo: {leftover}"
