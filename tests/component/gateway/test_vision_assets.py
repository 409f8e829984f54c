"""Image asset pointers end to end: the real tinker SDK, a local-mode gateway with both pointer sources
enabled (a real HTTP server on 127.0.0.1, allowlisted by host:port, and an asset root directory), real
trainer processes on the built-in tiny Qwen3-VL.

A pointer is the image bytes it names, fetched once at the gateway: sampling with it (seeded) and scoring a
prompt with it (compute_logprobs, the prompt's logprobs) give exactly what the same request with an
ImageChunk of those bytes gives. Every refusal is the SDK's BadRequestError naming the problem, and the run
goes on. The SDK 0.38 cannot put a pointer into forward/forward_backward (its protobuf has no such chunk):
the last test pins that, so an SDK that adds one fails here and tells us to serve it there too.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
import tinker
from PIL import Image
from tinker import types
from tinker_cookbook.renderers.base import image_to_chunk

from tests.support.asset_server import AssetServer, asset_server
from tests.support.sdk import DEV_KEY, GatewayProc, metric_value, start_gateway
from tinkerkube_contract.images import MAX_IMAGE_BYTES, MAX_IMAGES_PER_REQUEST
from tinkerkube_contract.models import TINY_QWEN3_VL
from tinkerkube_gateway.store.records import FutureOp

pytestmark = pytest.mark.slow

QUESTION = "What color is the square?"
FETCHES = "tinkerkube_gateway_image_asset_fetches_total"


def square(color: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (64, 48), (0, 0, 0))
    image.paste(color, (16, 12, 48, 36))
    return image


@pytest.fixture(scope="module")
def vl_dir(model_cache_dir: Path) -> Path:
    from tinkerkube_trainer.model_store import prepare

    return prepare(TINY_QWEN3_VL, model_cache_dir)


@pytest.fixture(scope="module")
def tokenizer(vl_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(vl_dir)


@pytest.fixture(scope="module")
def red(vl_dir: Path) -> types.ImageChunk:
    """A JPEG chunk with the client's own token count (the cookbook's image_to_chunk, the real processor)."""
    from tinker_cookbook.image_processing_utils import get_image_processor

    return image_to_chunk(square((255, 0, 0)), get_image_processor(str(vl_dir)))


@pytest.fixture(scope="module")
def server(red: types.ImageChunk) -> Iterator[AssetServer]:
    with asset_server() as s:
        s.files["red.jpg"] = red.data
        s.files["big.jpg"] = red.data + b"\x00" * MAX_IMAGE_BYTES
        yield s


@pytest.fixture(scope="module")
def asset_root(tmp_path_factory: pytest.TempPathFactory, red: types.ImageChunk) -> Path:
    root = tmp_path_factory.mktemp("assets")
    (root / "red.jpg").write_bytes(red.data)
    shutil.copy(root / "red.jpg", root.parent / "outside.jpg")
    return root


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, vl_dir: Path, model_cache_dir: Path, server: AssetServer,
            asset_root: Path) -> Iterator[GatewayProc]:
    env = {"TINKERKUBE_GATEWAY_IMAGE_ASSET_HOSTS": json.dumps([f"127.0.0.1:{server.port}"]),
           "TINKERKUBE_GATEWAY_IMAGE_ASSET_ROOT": str(asset_root),
           "TINKERKUBE_GATEWAY_IMAGE_ASSET_TIMEOUT_SECONDS": "20"}
    gw = start_gateway(tmp_path_factory.mktemp("gw-assets") / "state", model_cache_dir=model_cache_dir,
                       real_trainer=True, extra_env=env)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def training(gateway: GatewayProc) -> Iterator[tinker.TrainingClient]:
    with tinker.ServiceClient(base_url=gateway.url, api_key=DEV_KEY) as client:
        yield client.create_lora_training_client(base_model=TINY_QWEN3_VL, rank=4, seed=3).result()


@pytest.fixture(scope="module")
def sampler(training: tinker.TrainingClient) -> tinker.SamplingClient:
    return training.save_weights_and_get_sampling_client().result()


def prompt(tokenizer, image: types.ImageChunk | types.ImageAssetPointerChunk) -> types.ModelInput:
    before = tokenizer.encode("<|im_start|>user\n<|vision_start|>", add_special_tokens=False)
    after = tokenizer.encode(f"<|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    return types.ModelInput(chunks=[types.EncodedTextChunk(tokens=before), image,
                                    types.EncodedTextChunk(tokens=after)])


def pointer(red: types.ImageChunk, location: str, fmt: str = "jpeg") -> types.ImageAssetPointerChunk:
    return types.ImageAssetPointerChunk(format=fmt, location=location,  # type: ignore[arg-type]
                                        expected_tokens=red.expected_tokens)


PARAMS = types.SamplingParams(max_tokens=6, temperature=1.0, seed=7, stop=[])


def _sampled(sampler: tinker.SamplingClient, model_input: types.ModelInput) -> list[tuple[list[int], list[float]]]:
    out = sampler.sample(model_input, 2, PARAMS).result()
    return [(list(s.tokens), list(s.logprobs or [])) for s in out.sequences]


def test_a_url_pointer_samples_and_scores_exactly_like_the_image_bytes(
        sampler: tinker.SamplingClient, gateway: GatewayProc, server: AssetServer, tokenizer,
        red: types.ImageChunk) -> None:
    inline = prompt(tokenizer, red)
    by_url = prompt(tokenizer, pointer(red, server.url("/files/red.jpg")))
    expected = _sampled(sampler, inline)
    assert all(len(tokens) == 6 and all(math.isfinite(v) for v in lps) for tokens, lps in expected)
    hits = len(server.hits)
    assert _sampled(sampler, by_url) == expected
    assert len(server.hits) == hits + 1  # fetched once, at the gateway
    scored = sampler.compute_logprobs(inline).result()
    assert scored[0] is None and len(scored) == inline.length
    assert sampler.compute_logprobs(by_url).result() == scored
    assert metric_value(gateway, FETCHES, source="url", outcome="ok") == 2
    stored = _stored_sample_bodies(gateway)  # the op log a replay reads: bytes, no pointer to fetch again
    assert len(stored) == 4 and not any(b"image_asset_pointer" in body for body in stored)
    assert all(base64.b64encode(red.data) in body for body in stored)


def _stored_sample_bodies(gateway: GatewayProc) -> list[bytes]:
    with closing(sqlite3.connect(gateway.state_dir / "gateway.db")) as db:
        return [bytes(row[0]) for row in db.execute("SELECT body FROM futures WHERE op = ?", (FutureOp.SAMPLE,))]


def test_a_path_pointer_inside_the_asset_root_is_the_same_image(
        sampler: tinker.SamplingClient, gateway: GatewayProc, asset_root: Path, tokenizer,
        red: types.ImageChunk) -> None:
    expected = _sampled(sampler, prompt(tokenizer, red))
    assert _sampled(sampler, prompt(tokenizer, pointer(red, "red.jpg"))) == expected
    assert _sampled(sampler, prompt(tokenizer, pointer(red, f"file://{asset_root}/red.jpg"))) == expected
    assert metric_value(gateway, FETCHES, source="file", outcome="ok") == 2


@pytest.mark.parametrize(("location", "fmt", "problem", "outcome"), [
    ("http://localhost:{port}/files/red.jpg", "jpeg", "'localhost' is not among the allowed image asset hosts",
     "not_allowed"),
    ("http://127.0.0.1:{port}/files/missing.jpg", "jpeg", "answered 404", "failed"),
    ("http://127.0.0.1:{port}/files/big.jpg", "jpeg", f"at most {MAX_IMAGE_BYTES} are accepted", "too_large"),
    ("http://127.0.0.1:{port}/stream/big.jpg", "jpeg", f"larger than {MAX_IMAGE_BYTES} bytes", "too_large"),
    ("http://127.0.0.1:{port}/files/red.jpg", "png", "declared 'png' but its bytes are 'jpeg'", "bad_image"),
    ("../outside.jpg", "jpeg", "may not contain '..'", "not_allowed"),
    ("/etc/passwd", "jpeg", "outside the image asset root", "not_allowed"),
], ids=["host-not-allowed", "404", "too-large", "too-large-streamed", "wrong-format", "dot-dot", "outside-root"])
def test_bad_pointers_are_400s_and_the_run_goes_on(
        sampler: tinker.SamplingClient, training: tinker.TrainingClient, gateway: GatewayProc, server: AssetServer,
        tokenizer, red: types.ImageChunk, location: str, fmt: str, problem: str, outcome: str) -> None:
    source = "file" if location[0] in "./" else "url"
    before = metric_value(gateway, FETCHES, source=source, outcome=outcome)
    bad = prompt(tokenizer, pointer(red, location.format(port=server.port), fmt))
    with pytest.raises(tinker.BadRequestError, match=r"prompt.chunks\[1\]: image_asset_pointer .*" + problem):
        sampler.sample(bad, 1, PARAMS).result()
    assert metric_value(gateway, FETCHES, source=source, outcome=outcome) == before + 1
    assert len(_sampled(sampler, prompt(tokenizer, red))) == 2
    plain = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]})
    assert math.isfinite(training.forward([plain], "cross_entropy").result().metrics["loss:sum"])


def test_the_sdk_cannot_send_a_pointer_to_forward_backward(
        training: tinker.TrainingClient, server: AssetServer, tokenizer, red: types.ImageChunk) -> None:
    """SDK 0.38 sends forward/forward_backward as protobuf, whose Chunk has no asset pointer: it refuses the
    datum before anything is sent. Sampling prompts (JSON) are where pointers reach a server."""
    model_input = prompt(tokenizer, pointer(red, server.url("/files/red.jpg")))
    n = model_input.length
    datum = types.Datum(model_input=model_input, loss_fn_inputs={"target_tokens": [0] * n, "weights": [0.0] * n})
    hits = len(server.hits)
    with pytest.raises(ValueError, match="Unsupported model input chunk type: ImageAssetPointerChunk"):
        training.forward([datum], "cross_entropy").result()
    assert len(server.hits) == hits


def test_pointers_keep_the_image_bound_of_one_request(sampler: tinker.SamplingClient, tokenizer,
                                                      red: types.ImageChunk, server: AssetServer) -> None:
    hits = len(server.hits)
    many = types.ModelInput(chunks=[*prompt(tokenizer, red).chunks[:1],
                                    *[pointer(red, server.url("/files/red.jpg"))] * (MAX_IMAGES_PER_REQUEST + 1)])
    with pytest.raises(tinker.BadRequestError, match=f"more than {MAX_IMAGES_PER_REQUEST} image chunks"):
        sampler.sample(many, 1, PARAMS).result()
    assert len(server.hits) == hits  # refused before anything was fetched

