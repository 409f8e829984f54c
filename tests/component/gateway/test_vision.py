"""Image inputs end to end: the real tinker SDK, a local-mode gateway and real trainer processes on the
built-in tiny Qwen3-VL (tinkerkube/tiny-qwen3-vl), images made into chunks by the cookbook's own
`image_to_chunk` with the model's real image processor (so `expected_tokens` is the client's count).

The module shares one training run; the tests run in file order on it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tinker
import torch
from PIL import Image
from tinker import types
from tinker_cookbook.renderers.base import image_to_chunk

from tests.support.sdk import DEV_KEY, GatewayProc, start_gateway
from tinkerkube_contract import paths
from tinkerkube_contract.models import TINY_QWEN3, TINY_QWEN3_VL

pytestmark = pytest.mark.slow

QUESTION = "What is the name of the subject in this photo?"
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


@pytest.fixture(scope="module")
def vl_dir(model_cache_dir: Path) -> Path:
    from tinkerkube_trainer.model_store import prepare

    return prepare(TINY_QWEN3_VL, model_cache_dir)


@pytest.fixture(scope="module")
def vl_gateway(tmp_path_factory: pytest.TempPathFactory, vl_dir: Path, model_cache_dir: Path) -> Iterator[GatewayProc]:
    gw = start_gateway(tmp_path_factory.mktemp("gw-vision") / "state", model_cache_dir=model_cache_dir,
                       real_trainer=True)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def client(vl_gateway: GatewayProc) -> Iterator[tinker.ServiceClient]:
    with tinker.ServiceClient(base_url=vl_gateway.url, api_key=DEV_KEY) as c:
        yield c


@pytest.fixture(scope="module")
def training(client: tinker.ServiceClient) -> tinker.TrainingClient:
    return client.create_lora_training_client(base_model=TINY_QWEN3_VL, rank=4, seed=5).result()


@pytest.fixture(scope="module")
def tokenizer(vl_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(vl_dir)


@pytest.fixture(scope="module")
def processor(vl_dir: Path):
    from tinker_cookbook.image_processing_utils import get_image_processor

    return get_image_processor(str(vl_dir))


def sampler_of(training: tinker.TrainingClient) -> tinker.SamplingClient:
    """The training weights as a sampling client (the SDK hands back a future of it)."""
    return training.save_weights_and_get_sampling_client().result()


def square(color: str, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A colored square on black."""
    image = Image.new("RGB", size, (0, 0, 0))
    w, h = size
    image.paste(COLORS[color], (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    return image


def example(tokenizer, processor, color: str, size: tuple[int, int] = (64, 48)
            ) -> tuple[types.ImageChunk, list[int], list[int]]:
    """(image chunk, the text tokens before it, the text tokens after it, ending with the answer)."""
    chunk = image_to_chunk(square(color, size), processor)
    before = tokenizer.encode("<|im_start|>user\n<|vision_start|>", add_special_tokens=False)
    after = tokenizer.encode(f"<|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
                             f"The subject in this photo is: {color} square<|im_end|>", add_special_tokens=False)
    return chunk, before, after


def datum(tokenizer, processor, color: str, size: tuple[int, int] = (64, 48)) -> types.Datum:
    """Next-token targets over the whole sequence (image positions included, weight 0), answer weighted."""
    chunk, before, after = example(tokenizer, processor, color, size)
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert chunk.expected_tokens is not None
    full = before + [image_id] * chunk.expected_tokens + after
    answer = len(tokenizer.encode(f"The subject in this photo is: {color} square<|im_end|>", add_special_tokens=False))
    weights = [0.0] * (len(full) - 1 - answer) + [1.0] * answer
    model_input = types.ModelInput(chunks=[types.EncodedTextChunk(tokens=before), chunk,
                                           types.EncodedTextChunk(tokens=after[:-1])])
    assert model_input.length == len(full) - 1
    return types.Datum(model_input=model_input, loss_fn_inputs={"target_tokens": full[1:], "weights": weights})


def test_the_gateway_advertises_and_loads_the_tiny_vision_model(training: tinker.TrainingClient) -> None:
    assert training.get_info().model_data.model_name == TINY_QWEN3_VL


def test_forward_backward_with_images_is_finite_and_training_lowers_the_loss(
        training: tinker.TrainingClient, tokenizer, processor) -> None:
    batch = [datum(tokenizer, processor, c) for c in ("red", "green", "blue")]
    before = training.forward(batch, "cross_entropy").result()
    assert math.isfinite(before.metrics["loss:sum"]) and before.metrics["loss:sum"] > 0
    assert [len(o["logprobs"].data) for o in before.loss_fn_outputs] == [d.model_input.length for d in batch]
    for _ in range(4):
        out = training.forward_backward(batch, "cross_entropy").result()
        assert math.isfinite(out.metrics["loss:sum"])
        training.optim_step(types.AdamParams(learning_rate=2e-2)).result()
    after = training.forward(batch, "cross_entropy").result()
    assert after.metrics["loss:sum"] < 0.8 * before.metrics["loss:sum"]


def test_the_image_changes_the_logprobs(training: tinker.TrainingClient, tokenizer, processor) -> None:
    """Same text, different pixels: the vision tower's output reaches the language model."""
    red, blue = datum(tokenizer, processor, "red"), datum(tokenizer, processor, "blue")
    blue_pixels_red_text = types.Datum(
        model_input=types.ModelInput(chunks=[red.model_input.chunks[0], blue.model_input.chunks[1],
                                             red.model_input.chunks[2]]),
        loss_fn_inputs=red.loss_fn_inputs)
    out = training.forward([red, blue_pixels_red_text], "cross_entropy").result().loss_fn_outputs
    a, b = (np.asarray(o["logprobs"].data) for o in out)
    n = len(red.model_input.chunks[0].tokens)  # type: ignore[union-attr]
    assert np.allclose(a[:n], b[:n], atol=1e-6)  # before the image: the same
    assert not np.allclose(a[n:], b[n:], atol=1e-4)  # from the image on: not


def test_forward_logprobs_equal_a_transformers_peft_reference(
        training: tinker.TrainingClient, vl_gateway: GatewayProc, vl_dir: Path, tokenizer, processor) -> None:
    """The trained adapter in plain transformers + peft, fed the way transformers' Qwen-VL processors feed
    it (the image processor's patches, `<|image_pad|>` repeated `grid.prod() // merge_size**2` times) and
    left to compute its own positions: the same tokens and, float32 on CPU, the same logprobs."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    d = datum(tokenizer, processor, "green", size=(100, 70))  # not a multiple of the patch grid: resized
    ours = np.asarray(training.forward([d], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data)
    path = training.save_weights_for_sampler("vision-reference").result().path
    adapter = paths.parse_tinker_path(path).directory(vl_gateway.state_dir / "checkpoints")

    chunk, before, after = example(tokenizer, processor, "green", size=(100, 70))
    pixels = processor(images=[Image.open(io.BytesIO(chunk.data)).convert("RGB")], return_tensors="pt")
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n = int(pixels["image_grid_thw"].prod()) // processor.merge_size ** 2
    assert n == chunk.expected_tokens  # the processor's expansion is the SDK's count
    ids = torch.tensor([before + [image_id] * n + after])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == image_id).int(),
              "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
    ids = ids[0]

    base = AutoModelForImageTextToText.from_pretrained(vl_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    reference = torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None]).squeeze(-1).numpy()
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())  # trained adapter
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, atol=2e-4, rtol=0)


def test_sampling_with_an_image_prompt_is_seeded_and_reproducible(
        training: tinker.TrainingClient, tokenizer, processor) -> None:
    sampler = sampler_of(training)
    chunk, before, _ = example(tokenizer, processor, "red")
    prompt_tokens = tokenizer.encode(f"<|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
                                     add_special_tokens=False)
    prompt = types.ModelInput(chunks=[types.EncodedTextChunk(tokens=before), chunk,
                                      types.EncodedTextChunk(tokens=prompt_tokens)])
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=11, stop=[])
    first = sampler.sample(prompt, 2, params).result()
    again = sampler.sample(prompt, 2, params).result()
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]
    assert all(len(s.tokens) == 8 and s.logprobs and all(math.isfinite(v) for v in s.logprobs)
               for s in first.sequences)
    other = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=8, temperature=1.0, seed=12, stop=[])).result()
    assert [s.tokens for s in other.sequences] != [s.tokens for s in first.sequences]
    # Prompt logprobs of the same image + text are what forward computes for it.
    scored = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=1, seed=1), include_prompt_logprobs=True
                            ).result().prompt_logprobs
    assert scored is not None and scored[0] is None and len(scored) == prompt.length
    full = before + [tokenizer.convert_tokens_to_ids("<|image_pad|>")] * chunk.expected_tokens + prompt_tokens  # type: ignore[operator]
    fwd = types.Datum(model_input=types.ModelInput(chunks=[*prompt.chunks[:-1],
                                                           types.EncodedTextChunk(tokens=prompt_tokens[:-1])]),
                      loss_fn_inputs={"target_tokens": full[1:]})
    logprobs = training.forward([fwd], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
    np.testing.assert_allclose(np.asarray(scored[1:], dtype=np.float64), np.asarray(logprobs), atol=1e-4)


def _b64(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _huge_png_header() -> bytes:
    """A PNG whose header claims 30000 x 30000 pixels (a decompression bomb's shape); no pixel data."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


def _with_image(d: types.Datum, image: types.ImageChunk) -> types.Datum:
    chunks = list(d.model_input.chunks)
    return types.Datum(model_input=types.ModelInput(chunks=[chunks[0], image, chunks[2]]),
                       loss_fn_inputs=d.loss_fn_inputs)


@pytest.mark.parametrize(("data", "fmt", "problem"), [
    (b"definitely not an image", "png", "not a PNG or JPEG"),
    (b"\xff\xd8\xff" + b"\x00" * 64, "jpeg", "corrupt JPEG"),
    (_huge_png_header(), "png", "30000x30000"),
    (_b64(square("red"), "PNG"), "jpeg", "declared 'jpeg'"),
    (_b64(square("red"), "GIF"), "png", "not a PNG or JPEG"),
], ids=["garbage", "corrupt-jpeg", "huge-dimensions", "png-declared-jpeg", "gif"])
def test_bad_images_are_400s_and_the_run_goes_on(
        training: tinker.TrainingClient, tokenizer, processor,
        data: bytes, fmt: str, problem: str) -> None:
    """Through the SDK: the submit itself is refused (its seq_id consumed, so the next op is not held),
    for training and for sampling alike."""
    good = datum(tokenizer, processor, "red")
    good_image = good.model_input.chunks[1]
    assert isinstance(good_image, types.ImageChunk)
    bad = _with_image(good, types.ImageChunk(data=data, format=fmt, expected_tokens=good_image.expected_tokens))
    with pytest.raises(tinker.BadRequestError, match=problem):
        training.forward_backward([bad], "cross_entropy").result()
    assert math.isfinite(training.forward_backward([good], "cross_entropy").result().metrics["loss:sum"])
    sampler = sampler_of(training)
    with pytest.raises(tinker.BadRequestError, match=problem):
        sampler.sample(types.ModelInput(chunks=list(bad.model_input.chunks)), 1,
                       types.SamplingParams(max_tokens=1)).result()


def test_a_corrupt_body_behind_a_good_header_fails_the_op_as_the_users_error(
        training: tinker.TrainingClient, tokenizer, processor) -> None:
    good = datum(tokenizer, processor, "blue")
    chunk = good.model_input.chunks[1]
    assert isinstance(chunk, types.ImageChunk)
    broken = types.ImageChunk(data=chunk.data[: len(chunk.data) // 3], format="jpeg",
                              expected_tokens=chunk.expected_tokens)
    bad = types.Datum(model_input=types.ModelInput(chunks=[good.model_input.chunks[0], broken,
                                                           good.model_input.chunks[2]]),
                      loss_fn_inputs=good.loss_fn_inputs)
    with pytest.raises(tinker.RequestFailedError, match="cannot be decoded"):
        training.forward_backward([bad], "cross_entropy").result()
    wrong_count = types.ImageChunk(data=chunk.data, format="jpeg", expected_tokens=chunk.expected_tokens + 1)  # type: ignore[operator]
    n = good.model_input.length + 1
    miscounted = types.Datum(
        model_input=types.ModelInput(chunks=[good.model_input.chunks[0], wrong_count, good.model_input.chunks[2]]),
        loss_fn_inputs={"target_tokens": [0] * n, "weights": [0.0] * n})
    with pytest.raises(tinker.RequestFailedError, match="expected_tokens is"):
        training.forward_backward([miscounted], "cross_entropy").result()
    with pytest.raises(tinker.RequestFailedError, match="cannot be decoded"):
        sampler_of(training).sample(
            types.ModelInput(chunks=list(bad.model_input.chunks)), 1, types.SamplingParams(max_tokens=1)).result()
    assert math.isfinite(training.forward_backward([good], "cross_entropy").result().metrics["loss:sum"])


def test_image_asset_pointers_are_refused_unless_a_source_is_configured(
        vl_gateway: GatewayProc, training: tinker.TrainingClient, tokenizer, processor) -> None:
    """This gateway has no image asset hosts or root (the default): it fetches nothing, for the SDK or raw
    HTTP alike (test_vision_assets.py covers a gateway that does)."""
    with vl_gateway.http() as http:
        response = http.post("/api/v1/asample", json={
            "base_model": TINY_QWEN3_VL, "num_samples": 1, "sampling_params": {"max_tokens": 1},
            "prompt": {"chunks": [{"type": "image_asset_pointer", "format": "png", "location": "/etc/passwd"}]}})
    assert response.status_code == 400 and "image_asset_pointer chunks are not served here" in response.json()["detail"]
    chunk, before, _ = example(tokenizer, processor, "red")
    pointer = types.ImageAssetPointerChunk(format="jpeg", location="file:///etc/passwd",
                                           expected_tokens=chunk.expected_tokens)
    with pytest.raises(tinker.BadRequestError, match="TINKERKUBE_GATEWAY_IMAGE_ASSET_HOSTS"):
        sampler_of(training).sample(types.ModelInput(chunks=[types.EncodedTextChunk(tokens=before), pointer]), 1,
                                    types.SamplingParams(max_tokens=1)).result()


def test_a_text_only_model_refuses_image_chunks_as_the_users_error(
        client: tinker.ServiceClient, tokenizer, processor) -> None:
    text_only = client.create_lora_training_client(base_model=TINY_QWEN3, rank=4).result()
    d = datum(tokenizer, processor, "red")
    with pytest.raises(tinker.RequestFailedError, match="text-only"):
        text_only.forward_backward([d], "cross_entropy").result()
    plain = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]})
    assert math.isfinite(text_only.forward_backward([plain], "cross_entropy").result().metrics["loss:sum"])


