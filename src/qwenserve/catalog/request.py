"""GenerationRequest: a validated request, in the engine's terms, with its seed resolved."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

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
    for slugs that take them (qwen-image-2512); otherwise the runtime derives the size from
    ``aspect_ratio`` (``match_input_image`` or None → from the input image / model default).
    """

    slug: str
    prompt: str
    steps: int
    guidance: float
    seed: int
    image_format: ImageFormat
    quality: int
    base64: bool
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form, as the job store keeps it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        fields = dict(data)
        fields["images"] = tuple(InputImage(**i) for i in fields.get("images", ()))
        fields["extra_loras"] = tuple(LoraRef(**r) for r in fields.get("extra_loras", ()))
        return cls(**fields)
