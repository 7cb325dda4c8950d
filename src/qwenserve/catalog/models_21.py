"""The Qwen-Image 2.1 slugs: ``qwen-image-2.1`` and ``qwen-image-2.1-fast``.

No Segmind page exists for them, so the contract is ours, declared in the seed pages' style and
derived from the model itself (the Qwen-Image-2.1 README and diffusers' ``QwenImage21Pipeline``):

- one pipeline does text-to-image and editing: ``image_1``..``image_10`` are optional reference
  images, ten being the model's documented limit ("up to 10 reference images");
- native 2K sizes: the seven recommended ratios of the model's README (2048x2048 for 1:1, up to
  2752x1536 for 16:9, each about 2048² pixels); explicit ``width``/``height`` are capped at 2048
  a side, so no request exceeds the 2048² area; the pipeline floors sizes to multiples of 32
  (its 16x VAE times the 2x2 image slots), so other sizes are generated at the next multiple of 32
  and center-cropped;
- 40 steps and no CFG by default (``guidance`` 1; CFG runs only above 1, with the negative
  prompt), as the pipeline's own defaults;
- the VAE is RGBA: PNG and WEBP keep the alpha channel when the model makes a transparent image.

``qwen-image-2.1-fast`` is the official fast release, ``Qwen/Qwen-Image-2.1-Turbo``: a full
checkpoint of the same 7B transformer (its own weights, so its own resident pipeline), whose VAE
and text encoder are byte-identical to 2.1's (the runtime shares them by content hash when both
slugs are served). It samples 8 Euler steps without CFG on a fixed grid, the ``sample_sigmas``
of its ``model_index.json``: the pipeline takes that grid over any ``num_inference_steps``, and
no other grid is one its weights were distilled for (8 steps of the base do not make Turbo
either). So the slug has no ``steps``, ``guidance`` or ``negative_prompt`` parameter: it always
runs the grid's 8 steps at guidance 1 (``Recipe.default_steps``, ``fixed_sigma_grid``), and a
body that sends ``steps`` or ``guidance`` is refused with a 400 naming the field and saying so,
rather than accepted and silently run at 8 steps (what diffusers would do) or run on a grid the
weights were not made for. A LoRA trained on the base is reported to want a weight of about 0.6
on Turbo, but ``lora_2_url``/``lora_3_url`` apply at weight 1 here: a LoRA trained on Turbo
itself wants 1, and a file does not say which checkpoint it was trained on (the README tells
LoRA authors to scale a base LoRA down themselves).

The weights are under the Qwen Research License (the README says so where it lists them).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from qwenserve.catalog.spec import (
    SEED_CEILING,
    ModelSpec,
    Param,
    PipelineKind,
    Recipe,
    SchedulerKind,
    extra_lora_params,
)

QWEN_IMAGE_21_BASE = "Qwen/Qwen-Image-2.1"
QWEN_IMAGE_21_TURBO = "Qwen/Qwen-Image-2.1-Turbo"
TURBO_STEPS = 8
"""The length of Turbo's ``sample_sigmas`` grid: the steps every fast call runs."""

MAX_REFERENCE_IMAGES = 10
"""The model's documented limit ("up to 10 reference images", Qwen-Image-2.1 README)."""

MAX_SIDE = 2048
MIN_SIDE = 256

REFERENCE_AREA = 1024 * 1024
"""Each reference image is resized to about this many pixels: the pipeline's default
``output_resolution`` (1024). 2048² references would quadruple the reference KV cache (about
2 GiB per 1024² reference in bf16) for no documented gain."""

QWEN_IMAGE_21_SIZES: Mapping[str, tuple[int, int]] = MappingProxyType(
    {
        "1:1": (2048, 2048),
        "4:3": (2400, 1792),
        "3:4": (1792, 2400),
        "3:2": (2528, 1696),
        "2:3": (1696, 2528),
        "16:9": (2752, 1536),
        "9:16": (1536, 2752),
    }
)
"""The README's recommended sizes: every side a multiple of 32."""

ASPECT_RATIOS = (*QWEN_IMAGE_21_SIZES, "match_input_image")
IMAGE_FORMATS = ("png", "jpeg", "webp")


def _reference_params() -> tuple[Param, ...]:
    return tuple(
        Param(
            f"image_{index}",
            "uri",
            f"Reference image {index} (URL or base64); optional, up to {MAX_REFERENCE_IMAGES}",
            default=None,
        )
        for index in range(1, MAX_REFERENCE_IMAGES + 1)
    )


def _sampling_params(*, steps: int, max_steps: int) -> tuple[Param, ...]:
    """``negative_prompt``, ``steps`` and ``guidance``: only where the weights take a choice."""
    return (
        Param(
            "negative_prompt",
            "string",
            "What to avoid; used only with guidance above 1 (CFG).",
            default=None,
        ),
        Param(
            "steps",
            "integer",
            "Number of denoising steps.",
            default=steps,
            minimum=1,
            maximum=max_steps,
        ),
        Param(
            "guidance",
            "number",
            "Prompt adherence (true CFG); 1 means no CFG, the model's default.",
            default=1,
            minimum=1,
            maximum=20,
        ),
    )


def _params(sampling: tuple[Param, ...]) -> tuple[Param, ...]:
    return (
        Param(
            "prompt",
            "string",
            "Describe the image to create, or the edit to make to the reference images.",
            required=True,
        ),
        *sampling,
        Param(
            "seed",
            "integer",
            "Determines image variation. Use -1 for unique images.",
            default=-1,
            minimum=-1,
            maximum=SEED_CEILING,
            implicit_range=True,
        ),
        Param(
            "aspect_ratio",
            "string",
            "Image proportion at the native 2K size; match_input_image follows the last reference "
            "(1:1 without references). Ignored when width or height is sent.",
            default="match_input_image",
            allowed=ASPECT_RATIOS,
        ),
        Param(
            "width",
            "integer",
            "Output width in pixels (overrides aspect_ratio).",
            default=None,
            minimum=MIN_SIDE,
            maximum=MAX_SIDE,
        ),
        Param(
            "height",
            "integer",
            "Output height in pixels (overrides aspect_ratio).",
            default=None,
            minimum=MIN_SIDE,
            maximum=MAX_SIDE,
        ),
        *_reference_params(),
        Param(
            "image_format",
            "string",
            "Output format; PNG and WEBP keep transparency when the model makes an RGBA image.",
            default="png",
            allowed=IMAGE_FORMATS,
        ),
        Param("quality", "integer", "Output image quality.", default=90, minimum=10, maximum=100),
        Param("base64", "boolean", "Return the image as a base64 string.", default=False),
        *extra_lora_params(),
    )


def _recipe(
    weights: str, *, default_steps: int | None = None, fixed_sigma_grid: bool = False
) -> Recipe:
    return Recipe(
        pipeline=PipelineKind.QWEN_IMAGE_21,
        base_weights=weights,
        scheduler=SchedulerKind.STOCK,  # the checkpoint's own scheduler configuration
        max_input_images=MAX_REFERENCE_IMAGES,
        images_optional=True,
        native_sizes=QWEN_IMAGE_21_SIZES,
        default_area=2048 * 2048,
        size_multiple=32,
        reference_area=REFERENCE_AREA,
        default_steps=default_steps,
        fixed_sigma_grid=fixed_sigma_grid,
    )


QWEN_IMAGE_21 = ModelSpec(
    slug="qwen-image-2.1",
    title="Qwen Image 2.1",
    summary=(
        "Text-to-image and editing with up to 10 reference images (Qwen-Image 2.1, 2K, RGBA; "
        f"weights {QWEN_IMAGE_21_BASE})."
    ),
    price_usd=0.04,
    params=_params(_sampling_params(steps=40, max_steps=60)),
    recipe=_recipe(QWEN_IMAGE_21_BASE),
)

QWEN_IMAGE_21_FAST = ModelSpec(
    slug="qwen-image-2.1-fast",
    title="Qwen Image 2.1 Fast",
    summary=(
        f"Qwen-Image 2.1 Turbo: {TURBO_STEPS} steps without CFG on its fixed sigma grid, "
        f"text-to-image and reference edits (weights {QWEN_IMAGE_21_TURBO})."
    ),
    price_usd=0.01,
    params=_params(()),
    recipe=_recipe(QWEN_IMAGE_21_TURBO, default_steps=TURBO_STEPS, fixed_sigma_grid=True),
)

QWEN_IMAGE_21_MODELS: tuple[ModelSpec, ...] = (QWEN_IMAGE_21, QWEN_IMAGE_21_FAST)
