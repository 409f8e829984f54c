"""Images in a pool of the tiny Qwen3-VL: the token count is the cookbook's, image-bearing and text-only
ops co-batch with each one's math alone, and image prompts decode together with text prompts of other
lengths (left padding, 3-axis positions) with each one's results alone."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tinker import types
from tinker.proto.response_conv import deserialize_sample_response
from tinker_cookbook.renderers.base import image_to_chunk

from tests.component.trainer.engine_fixtures import ce_datums, fb_body
from tests.component.trainer.test_pool_engine import assert_same_fb, assert_same_run, ok
from tinkerkube_contract.models import TINY_QWEN3_VL
from tinkerkube_contract.pod_api import CONTENT_JSON, CONTENT_PROTOBUF, OpKind, RunSpec, SampleOp
from tinkerkube_contract.resource import LoraSpec
from tinkerkube_trainer.engine import PoolEngine, build_engine
from tinkerkube_trainer.engine_api import LocalCollective, OpError, PoolConfig, PreparedOp

RUNS = {"vl:train:0": LoraSpec(rank=4, alpha=8.0, seed=1), "vl:train:1": LoraSpec(rank=2, alpha=4.0, seed=2)}


@pytest.fixture(scope="module")
def vl_dir(model_cache_dir: Path) -> Path:
    from tinkerkube_trainer.model_store import prepare

    return prepare(TINY_QWEN3_VL, model_cache_dir)


def pool(tmp_path: Path, cache: Path, *model_ids: str) -> PoolEngine:
    engine = build_engine(PoolConfig(base_model=TINY_QWEN3_VL, checkpoint_dir=tmp_path / "ckpt",
                                     model_cache_dir=cache, device="cpu"), LocalCollective())
    for model_id in model_ids:
        outcome = engine.run_pass([engine.prepare_attach(RunSpec(model_id=model_id, base_model=TINY_QWEN3_VL,
                                                                 lora=RUNS[model_id]))])[0]
        assert not isinstance(outcome, OpError), outcome
    return engine


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def image_datums(engine: PoolEngine, seed: int) -> list[types.Datum]:
    """Datums of different lengths with 1 or 2 images of different sizes, text around them."""
    from tinker_cookbook.image_processing_utils import get_image_processor

    processor = get_image_processor(engine.model_dir)
    rng = np.random.default_rng(seed)
    out = []
    for i, sizes in enumerate([[(64, 48)], [(100, 70), (40, 130)], [(200, 200)]]):
        chunks: list[Any] = []
        for j, size in enumerate(sizes):
            chunks.append(types.EncodedTextChunk(tokens=[int(t) for t in rng.integers(5, 500, 2 + i + j)]))
            chunks.append(image_to_chunk(picture(seed * 10 + i * 3 + j, size), processor))
        chunks.append(types.EncodedTextChunk(tokens=[int(t) for t in rng.integers(5, 500, 3 + i)]))
        model_input = types.ModelInput(chunks=chunks)
        n = model_input.length
        out.append(types.Datum(model_input=model_input, loss_fn_inputs={
            "target_tokens": [int(t) for t in rng.integers(5, 500, n)],
            "weights": [float(w) for w in rng.uniform(0.1, 1.0, n)]}))
    return out


def fb(engine: PoolEngine, model_id: str, data: list[types.Datum]) -> PreparedOp:
    return engine.prepare(model_id, OpKind.FORWARD_BACKWARD, fb_body(data), CONTENT_PROTOBUF)


def test_the_image_token_count_is_the_cookbooks(vl_dir: Path) -> None:
    from tinker_cookbook.image_processing_utils import get_image_processor

    from tinkerkube_trainer.engine_api import OpError as Err
    from tinkerkube_trainer.vision import ImageEncoder

    processor = get_image_processor(str(vl_dir))
    encoder = ImageEncoder(processor, 7)
    for size in [(16, 16), (64, 48), (100, 70), (1000, 30), (30, 1000), (480, 480)]:
        chunk = image_to_chunk(picture(1, size), processor)
        encoded = encoder.encode(chunk.data, chunk.format, chunk.expected_tokens, "x")
        assert len(encoded.tokens) == chunk.expected_tokens and set(encoded.tokens) == {7}, size
        assert encoded.pixel_values.shape[0] == int(encoded.grid_thw.prod())  # one row per patch
    with pytest.raises(Err, match="expected_tokens is 99") as err:
        encoder.encode(chunk.data, chunk.format, 99, "x")
    assert err.value.code == "image_token_mismatch" and err.value.category == "user"
    buf = io.BytesIO()
    picture(2, (64, 64)).save(buf, format="PNG")
    with pytest.raises(Err, match="cannot be decoded"):
        encoder.encode(buf.getvalue()[:200], "png", None, "x")


def test_image_and_text_ops_co_batch_with_their_math_alone(tmp_path: Path, model_cache_dir: Path,
                                                           vl_dir: Path) -> None:
    shared = pool(tmp_path / "shared", model_cache_dir, *RUNS)
    alone = {m: pool(tmp_path / m.replace(":", "-"), model_cache_dir, m) for m in RUNS}
    data = {"vl:train:0": image_datums(shared, 1), "vl:train:1": ce_datums(4, seed=3)}  # images / text only
    for _ in range(2):
        outs = shared.run_pass([fb(shared, m, data[m]) for m in RUNS])  # one forward/backward for both
        for m, out in zip(RUNS, outs, strict=True):
            assert_same_fb(ok(out), ok(alone[m].run_pass([fb(alone[m], m, data[m])])[0]))
            assert_same_run(shared, alone[m], m)
        lr = json.dumps({"adam_params": {"learning_rate": 0.05}}).encode()
        for engine in (shared, *alone.values()):
            for m in RUNS:
                if m in engine.runs:
                    ok(engine.run_pass([engine.prepare(m, OpKind.OPTIM_STEP, lr, CONTENT_JSON)])[0])


def test_image_prompts_decode_together_with_text_prompts(tmp_path: Path, model_cache_dir: Path,
                                                         vl_dir: Path) -> None:
    from tinker_cookbook.image_processing_utils import get_image_processor

    engine = pool(tmp_path, model_cache_dir, "vl:train:0")
    ok(engine.run_pass([fb(engine, "vl:train:0", image_datums(engine, 2))])[0])
    lr = json.dumps({"adam_params": {"learning_rate": 0.5}}).encode()
    ok(engine.run_pass([engine.prepare("vl:train:0", OpKind.OPTIM_STEP, lr, CONTENT_JSON)])[0])
    processor = get_image_processor(engine.model_dir)
    image = image_to_chunk(picture(5, (90, 60)), processor)
    prompts = [types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[3, 9]), image,
                                        types.EncodedTextChunk(tokens=[4, 11, 12])]),
               types.ModelInput.from_ints([20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34]),
               types.ModelInput(chunks=[image, types.EncodedTextChunk(tokens=[40])])]

    def op(prompt: types.ModelInput, seed: int) -> PreparedOp:
        req = types.SampleRequest(prompt=prompt, num_samples=2, prompt_logprobs=True,
                                  sampling_params=types.SamplingParams(max_tokens=6, seed=seed, stop=[]))
        body = SampleOp(request=req.model_dump(mode="json", exclude_none=True), model_id="vl:train:0")
        return engine.prepare(None, OpKind.SAMPLE, body.model_dump_json().encode(), CONTENT_JSON)

    def result(outcome: Any) -> tuple[list[list[int]], list[list[float]], list[float]]:
        r = deserialize_sample_response(ok(outcome).body)
        return ([list(s.tokens) for s in r.sequences], [list(s.logprobs or []) for s in r.sequences],
                [float("nan") if v is None else v for v in r.prompt_logprobs or []])

    together = engine.run_pass([op(p, 7 + i) for i, p in enumerate(prompts)])
    for i, (prompt, out) in enumerate(zip(prompts, together, strict=True)):
        got, want = result(out), result(engine.run_pass([op(prompt, 7 + i)])[0])
        assert got[0] == want[0], i
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got[2]), np.asarray(want[2]), rtol=1e-4, atol=1e-5)
        assert len(got[2]) == prompt.length
