"""The shapes a model declaration is made of: parameters, recipes, specs. Plain data."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

SEED_CEILING = 2**63 - 1
"""A seed the page gives no range for still has to fit torch's 64-bit generator."""

ParamType = Literal["string", "integer", "number", "boolean", "uri"]


class _NoDefault:
    """Marks a parameter whose seed page lists no default at all."""

    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT: Any = _NoDefault()


@dataclass(frozen=True)
class Param:
    """One parameter exactly as its seed page states it.

    ``default`` is the page's default (``None`` where the page says null, ``NO_DEFAULT`` where it
    says nothing). ``required`` is the page's own mark; what a client must actually send is
    ``must_send``: defaults fill, never block, so a "required" parameter with a default (``steps``
    on three pages) takes it when omitted or null. ``default_is_sample`` marks a page default
    that is its playground's sample text (qwen-image-fast's prompt), never filled in for a
    client. ``minimum``/``maximum`` are inclusive. ``implicit_range`` marks a bound the page
    does not list but that the service needs (a seed must fit a 64-bit generator).
    """

    name: str
    type: ParamType
    description: str
    required: bool = False
    default: Any = NO_DEFAULT
    minimum: float | None = None
    maximum: float | None = None
    allowed: tuple[str, ...] | None = None
    implicit_range: bool = False
    default_is_sample: bool = False

    @property
    def has_default(self) -> bool:
        return self.default is not NO_DEFAULT

    @property
    def must_send(self) -> bool:
        """Whether a body without it (or with null) is refused: the page requires it and there
        is nothing to fill it with. Everything else takes its default when omitted."""
        return self.required and (not self.has_default or self.default_is_sample)


EXTRA_LORA_FIELDS = ("lora_2_url", "lora_3_url")
"""The per-request LoRA URL parameters, as the product-photography seed page spells them."""


def extra_lora_params() -> tuple[Param, ...]:
    """``lora_2_url`` and ``lora_3_url``: per-request LoRAs, as the product-photography seed page
    spells them (every slug that takes them declares these two)."""
    description = "Additional LoRA model URL (public direct URL or Hugging Face URL to the file)"
    return tuple(Param(name, "string", description, default=None) for name in EXTRA_LORA_FIELDS)


class PipelineKind(enum.StrEnum):
    """Which diffusers pipeline class runs a model."""

    TEXT_TO_IMAGE = "QwenImagePipeline"
    EDIT = "QwenImageEditPipeline"
    EDIT_PLUS = "QwenImageEditPlusPipeline"
    QWEN_IMAGE_21 = "QwenImage21Pipeline"
    """Qwen-Image 2.1: text-to-image and editing with 0..n reference images in one pipeline."""


class SchedulerKind(enum.StrEnum):
    """Scheduler configuration: the base model's own, or the Lightning (fixed shift 3) one."""

    STOCK = "stock"
    LIGHTNING = "lightning"


@dataclass(frozen=True)
class LoraSource:
    """A LoRA file on the Hugging Face hub (or any URL the LoRA fetcher accepts)."""

    repo: str
    filename: str
    weight: float = 1.0
    trigger: str = ""
    """Text the LoRA was trained to expect before the prompt (empty when none)."""

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/resolve/main/{self.filename}"


@dataclass(frozen=True)
class Recipe:
    """How a slug runs: pipeline, base weights, distillation LoRA, scheduler and sampler defaults.

    ``base_weights`` is also the residency key: slugs with the same base share one resident
    pipeline (qwen-image and qwen-image-fast both run on ``Qwen/Qwen-Image``; the fast slug
    switches the Lightning adapter on for its own calls only).
    """

    pipeline: PipelineKind
    base_weights: str
    scheduler: SchedulerKind
    lightning: LoraSource | None = None
    preset_loras: Mapping[str, LoraSource] = field(default_factory=dict)
    default_steps: int | None = None
    """Steps for a slug that does not expose ``steps``."""
    fixed_sigma_grid: bool = False
    """The checkpoint's own ``sample_sigmas`` grid (its ``model_index.json``) is the only schedule
    its weights were distilled for (Qwen-Image-2.1-Turbo): every call samples it as it is, and
    the runtime refuses to run a checkpoint without one or with one of another length than
    ``default_steps``. False: ``steps`` chooses the schedule."""
    max_input_images: int = 0
    native_sizes: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    """Aspect ratio → (width, height) at the model's native resolution."""
    default_area: int = 1024 * 1024
    """Pixel area used for ratios without a native size and for matching an input image."""
    images_optional: bool = False
    """True where the model also generates from text alone (Qwen-Image 2.1): its reference
    images are optional, not "at least one"."""
    size_multiple: int = 16
    """The pipeline floors sizes to this multiple (16; 32 for Qwen-Image 2.1)."""
    reference_area: int | None = None
    """Pixel area the pipeline resizes each reference image to (2.1's ``output_resolution``²);
    None where the pipeline fixes it itself."""
    max_prompt_tokens: int | None = None
    """Prompt tokens (as the pipeline's tokenizer counts them, a preset's trigger word included)
    the pipeline can take; a longer prompt is refused (400 naming ``prompt``) before it runs.
    None: the pipeline truncates a longer prompt itself (the text-to-image pipelines)."""


@dataclass(frozen=True)
class ModelSpec:
    """One slug: its parameter contract (from its seed page), its price and its recipe."""

    slug: str
    title: str
    summary: str
    params: tuple[Param, ...]
    recipe: Recipe
    price_usd: float

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def base64_field(self) -> str:
        """``base64`` on most pages, ``base_64`` on qwen-image-2512's."""
        return "base_64" if self.param("base_64") is not None else "base64"

    @property
    def generates_from_text(self) -> bool:
        """Whether a body without input images is a whole request (text-to-image)."""
        return self.recipe.pipeline is PipelineKind.TEXT_TO_IMAGE or self.recipe.images_optional

    @property
    def edits_images(self) -> bool:
        """Whether the slug takes input images (edits)."""
        return self.recipe.max_input_images > 0

    @property
    def kind(self) -> str:
        """What ``GET /v1/models`` calls it: text-to-image, edit, or both."""
        if not self.edits_images:
            return "text-to-image"
        return "text-to-image+edit" if self.generates_from_text else "edit"

    @property
    def image_fields(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params if p.type == "uri")
