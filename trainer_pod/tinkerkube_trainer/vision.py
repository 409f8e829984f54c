"""Images in a model input: an image chunk becomes its run of image tokens plus the patches the vision
tower embeds into them, and the model gets the multimodal inputs it needs around a forward.

Why here: the SDK counts an ImageChunk as `expected_tokens` positions (`ImageChunk.length`), and the
cookbook computes that count with the model's own image processor (`get_number_of_image_patches //
merge_size**2`). The model sees `<|vision_start|>`, then that many `<|image_pad|>` tokens, then
`<|vision_end|>` (the renderer sends the two markers as text). So this module runs the model's real
image processor on the decoded pixels, checks its token count against `expected_tokens` (a mismatch is
the user's error: every loss input would be misaligned), and expands the chunk into exactly that many
image tokens, the way transformers' Qwen-VL processors expand `<|image_pad|>`.

Vision-language models supported: those whose config has a `vision_config` and an `image_token_id`,
whose image processor reports `merge_size` and whose model computes multimodal RoPE with
`model.get_rope_index` (the Qwen2-VL / Qwen2.5-VL / Qwen3-VL family). Payloads stay numpy so rank 0 can
broadcast them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from tinkerkube_contract.images import MAX_IMAGES_PER_REQUEST, BadImage, check_image
from tinkerkube_trainer.engine_api import OpError


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """One image as the model takes it: its token ids and the vision tower's input for it."""

    tokens: np.ndarray  # int64 (n,), all the image token id
    pixel_values: np.ndarray  # float32 (patches, channels * temporal * patch * patch)
    grid_thw: np.ndarray  # int64 (1, 3)


@dataclass(frozen=True, slots=True)
class ImageBatch:
    """The images of some rows, in row-major order of their tokens (what the model scatters them by)."""

    pixel_values: np.ndarray  # float32 (patches, dim)
    grid_thw: np.ndarray  # int64 (images, 3)

    @staticmethod
    def join(parts: Sequence[ImageBatch | None]) -> ImageBatch | None:
        present = [p for p in parts if p is not None]
        if not present:
            return None
        return ImageBatch(np.concatenate([p.pixel_values for p in present]),
                          np.concatenate([p.grid_thw for p in present]))

    @staticmethod
    def of(images: Sequence[EncodedImage]) -> ImageBatch | None:
        if not images:
            return None
        return ImageBatch(np.concatenate([i.pixel_values for i in images]),
                          np.concatenate([i.grid_thw for i in images]))


class ImageEncoder:
    """The model's image processor and image token: ImageChunk bytes → `EncodedImage`."""

    def __init__(self, processor: Any, image_token_id: int) -> None:
        self.processor = processor
        self.image_token_id = int(image_token_id)
        self.merge = int(getattr(processor, "merge_size", 1))

    @classmethod
    def load(cls, model: torch.nn.Module, model_dir: str) -> ImageEncoder | None:
        """The encoder of a vision-language model; None for a text-only one (image chunks are then refused)."""
        config = getattr(model, "config", None)
        token = getattr(config, "image_token_id", None)
        if getattr(config, "vision_config", None) is None or token is None:
            return None
        # (transformers 5.5 refuses `from transformers import AutoImageProcessor` without torchvision; the module
        # itself, as the cookbook imports it, picks the Pillow backend)
        from transformers.models.auto.image_processing_auto import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        return cls(processor, int(token))

    def encode(self, data: bytes, declared: str, expected_tokens: int | None, where: str) -> EncodedImage:
        """Bounds, decode, the real processor; OpError (the user's) for anything wrong with the image."""
        from PIL import Image, UnidentifiedImageError

        try:
            check_image(data, declared)
            with Image.open(io.BytesIO(data)) as opened:
                image = opened.convert("RGB")  # decodes every pixel: a truncated or corrupt body fails here
        except BadImage as exc:
            raise OpError(f"{where}: {exc}", code="invalid_image") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise OpError(f"{where}: the {declared} image cannot be decoded ({exc})", code="invalid_image") from None
        out = self.processor(images=[image], return_tensors="np")
        grid = np.asarray(out["image_grid_thw"], dtype=np.int64).reshape(1, 3)
        n = int(grid.prod()) // (self.merge ** 2)
        if expected_tokens is not None and expected_tokens != n:
            raise OpError(f"{where}: expected_tokens is {expected_tokens} but this model's image processor makes "
                          f"{n} tokens of this {image.width}x{image.height} image", code="image_token_mismatch")
        return EncodedImage(np.full(n, self.image_token_id, dtype=np.int64),
                            np.asarray(out["pixel_values"], dtype=np.float32), grid)


class Images(Protocol):
    """What decoding needs of a vision-language model (`ImageEncoder`); None stands for a text-only model."""

    def encode(self, data: bytes, declared: str, expected_tokens: int | None, where: str) -> EncodedImage: ...


def image_tokens(images: Images | None, data: bytes, declared: str, expected: int | None, where: str,
                 seen: list[EncodedImage]) -> np.ndarray:
    """One image chunk of a request → its image tokens (its patches appended to `seen`, in token order)."""
    if images is None:
        raise OpError(f"{where}: this base model is text-only and takes no image chunks; use a vision-language "
                      "model (docs/vision.md)", code="unsupported_chunk")
    if len(seen) >= MAX_IMAGES_PER_REQUEST:
        raise OpError(f"{where}: more than {MAX_IMAGES_PER_REQUEST} images in one request", code="too_many_images")
    encoded = images.encode(data, declared, expected, where)
    seen.append(encoded)
    return encoded.tokens


def is_multimodal(model: torch.nn.Module) -> bool:
    """A model whose positions are multimodal RoPE (3 axes): its positions must always be given explicitly,
    or it falls back on `rope_deltas` cached from whatever forward ran last."""
    inner = getattr(model, "model", None)
    return getattr(getattr(model, "config", None), "vision_config", None) is not None and \
        hasattr(inner, "get_rope_index")


def model_inputs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 images: ImageBatch | None) -> dict[str, Any]:
    """The keyword arguments a multimodal forward over `input_ids` needs: the vision tower's inputs and
    the 3-axis positions (`get_rope_index`, which places each image on its grid and the text after it)."""
    device = input_ids.device
    image_token = int(model.config.image_token_id)  # type: ignore[union-attr]
    kinds = (input_ids == image_token).to(torch.int32)
    grid = None if images is None else torch.from_numpy(images.grid_thw).to(device)
    positions, _ = model.model.get_rope_index(  # type: ignore[union-attr,operator]
        input_ids, mm_token_type_ids=kinds, image_grid_thw=grid, attention_mask=attention_mask)
    kwargs: dict[str, Any] = {"position_ids": positions, "attention_mask": attention_mask}
    if images is not None:
        kwargs["pixel_values"] = torch.from_numpy(images.pixel_values).to(device)
        kwargs["image_grid_thw"] = grid
        kwargs["mm_token_type_ids"] = kinds
    return kwargs
