"""GenerationRequest: a validated request, in the engine's terms, with its seed resolved."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qwenserve.catalog.sizes import OutputSize

ImageFormat = Literal["png", "jpeg", "webp"]

CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True)
class InputImage:
    """An input image as the client sent it: the field it came in and its source string."""

    field: str
    source: str


@dataclass(frozen=True)
class LoraRef:
    """An extra LoRA named by URL (or configured local path) in a request field."""

    field: str
    location: str


@dataclass(frozen=True)
class GenerationRequest:
    """Everything the engine needs to produce one image, already checked against the contract.

    ``seed`` is always concrete (a requested -1 or null was replaced by a random seed at
    validation), so a job that is retried after a crash reproduces the same image.
    ``guidance`` 1.0 means no classifier-free-guidance pass. ``width``/``height`` are set only
    for slugs that take them (qwen-image-2512); ``size`` is the output size validation fixed
    from them or from ``aspect_ratio`` (``catalog/sizes.py``): the runtime generates at it and
    never plans from the fields again. Build requests with ``validate_request``; a copy made
    with ``dataclasses.replace`` keeps its ``size``. Turned into stored text and back only by
    the stores (``store/records.py``).
    """

    slug: str
    prompt: str
    steps: int
    guidance: float
    seed: int
    image_format: ImageFormat
    quality: int
    base64: bool
    size: OutputSize
    negative_prompt: str | None = None
    aspect_ratio: str | None = None
    width: int | None = None
    height: int | None = None
    images: tuple[InputImage, ...] = ()
    lora: str | None = None
    extra_loras: tuple[LoraRef, ...] = ()
    partial_images: int = 0
    """Previews to make while denoising (OpenAI's ``partial_images``; none for Segmind)."""
    preview_id: str | None = None
    """Media id prefix the previews are stored under (``media/previews.py``), chosen at submit."""

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.image_format]
