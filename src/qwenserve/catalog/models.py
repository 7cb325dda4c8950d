"""The five seed model declarations, each transcribed from its seed page in shared/seeds/
(the Qwen-Image 2.1 slugs, which have no page, are declared in models_21.py).

Every parameter's name, type, default, range, allowed values and required flag is the contract
and is written here exactly as the page states it, oddities included (qwen-image-2512 spells
``base_64`` and caps its seed at 92147483647; edit-plus elides its eleventh aspect ratio, which is
its default ``match_input_image``). Prices are USD per run: qwen-image's is the page's ~$0.121;
the pages give no price for the others, so ours are defaults, overridable in Settings.

Weight sharing: qwen-image and qwen-image-fast run on the same ``Qwen/Qwen-Image`` base (the
fast slug turns the Lightning adapter on for its own calls). qwen-image-2512 has its own base
checkpoint, and the edit slugs theirs, so they share nothing with the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from qwenserve.catalog.models_21 import QWEN_IMAGE_21_MODELS
from qwenserve.catalog.spec import (
    NO_DEFAULT,
    SEED_CEILING,
    LoraSource,
    ModelSpec,
    Param,
    PipelineKind,
    Recipe,
    SchedulerKind,
    extra_lora_params,
)

QWEN_IMAGE_SIZES: Mapping[str, tuple[int, int]] = MappingProxyType(
    {
        "1:1": (1328, 1328),
        "16:9": (1664, 928),
        "9:16": (928, 1664),
        "4:3": (1472, 1104),
        "3:4": (1104, 1472),
        "3:2": (1584, 1056),
        "2:3": (1056, 1584),
    }
)

T2I_ASPECT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3")
EDIT_PLUS_ASPECT_RATIOS = (
    "1:1",
    "2:3",
    "3:2",
    "3:4",
    "4:3",
    "4:5",
    "5:4",
    "9:16",
    "16:9",
    "21:9",
    "match_input_image",
)
IMAGE_FORMATS_PNG_FIRST = ("png", "jpeg", "webp")
IMAGE_FORMATS_JPEG_FIRST = ("jpeg", "png", "webp")

LIGHTNING_REPO = "lightx2v/Qwen-Image-Lightning"

EDIT_PROMPT_TOKENS = 1024
"""The edit slugs' prompt limit, in Qwen tokens (``Recipe.max_prompt_tokens``).

Unlike the text-to-image pipelines, diffusers' edit pipelines encode the whole prompt (no
truncation; ``max_sequence_length`` is not applied), and the text sequence also carries the input
images' vision tokens (14 px patches merged 2x2: ~1,340 for qwen-image-edit's ~1 MP image, ~190
for each of edit-plus's 384x384 condition images). The transformer's text RoPE table has 4,096
positions, starting after the image's (``max(h, w) / 2`` packed latents, 64 at 2,048 px): a
longer sequence fails in the first attention ("The size of tensor a (…) must match …"), so
qwen-image-edit breaks past roughly 4096 - 1340 - 64 - a dozen template tokens = ~2,680 prompt
tokens. 1,024 is what the text-to-image pipelines keep (diffusers' own ceiling on
``max_sequence_length``), well inside that. No character bound is derived: one Qwen token can
cover one to many characters, so no character count guarantees either side of the limit."""

QWEN_IMAGE = ModelSpec(
    slug="qwen-image",
    title="Qwen Image",
    summary="Text-to-image with multilingual text rendering (Qwen-Image, true CFG).",
    price_usd=0.121,
    params=(
        Param(
            "prompt",
            "string",
            "Describe imaginative landscapes or detailed environments for image generation.",
            required=True,
        ),
        Param(
            "steps",
            "integer",
            "Number of steps for generating the image",
            required=True,
            default=30,
            minimum=1,
            maximum=50,
        ),
        Param(
            "aspect_ratio",
            "string",
            "Defines image proportion.",
            default="16:9",
            allowed=T2I_ASPECT_RATIOS,
        ),
        Param("base64", "boolean", "Outputs base64 image string.", default=False),
        Param(
            "guidance",
            "number",
            "Adjusts adherence to prompt.",
            default=3.5,
            minimum=1,
            maximum=20,
        ),
        Param(
            "image_format",
            "string",
            "Select image format.",
            default="png",
            allowed=IMAGE_FORMATS_PNG_FIRST,
        ),
        Param(
            "negative_prompt",
            "string",
            "Exclude elements to control results.",
            default="blurry, cartoonish",
        ),
        Param("quality", "integer", "Set clarity level.", default=90, minimum=10, maximum=100),
        Param(
            "seed",
            "integer",
            "Determines image variation. Use -1 for unique images.",
            default=-1,
            minimum=-1,
            maximum=SEED_CEILING,
            implicit_range=True,
        ),
    ),
    recipe=Recipe(
        pipeline=PipelineKind.TEXT_TO_IMAGE,
        base_weights="Qwen/Qwen-Image",
        scheduler=SchedulerKind.STOCK,
        native_sizes=QWEN_IMAGE_SIZES,
    ),
)

QWEN_IMAGE_FAST = ModelSpec(
    slug="qwen-image-fast",
    title="Qwen Image Fast",
    summary="Text-to-image in 8 steps (Qwen-Image + Lightning distillation LoRA).",
    price_usd=0.02,
    params=(
        Param(
            "prompt",
            "string",
            "Describe imaginative scenes for image creation.",
            required=True,
            default="A serene lakeside with glowing fireflies under a moonlit sky.",
            # The page's sample prompt: a client that sends none is told so, not charged for it.
            default_is_sample=True,
        ),
        Param(
            "steps",
            "integer",
            "Number of steps for image refinement.",
            required=True,
            default=8,
            minimum=1,
            maximum=16,
        ),
        Param(
            "aspect_ratio",
            "string",
            "Selects image shape.",
            default="1:1",
            allowed=T2I_ASPECT_RATIOS,
        ),
        Param("base64", "boolean", "Outputs as base64 string for embedding.", default=False),
        Param(
            "guidance",
            "number",
            "Sets prompt adherence level.",
            default=1,
            minimum=1,
            maximum=20,
        ),
        Param(
            "image_format",
            "string",
            "Choose format for image storage.",
            default="png",
            allowed=IMAGE_FORMATS_PNG_FIRST,
        ),
        Param(
            "quality", "integer", "Sets image detail level.", default=90, minimum=10, maximum=100
        ),
        Param(
            "seed",
            "integer",
            "Seed controls image uniqueness. Use -1 for new variations.",
            default=-1,
            minimum=-1,
            maximum=SEED_CEILING,
            implicit_range=True,
        ),
    ),
    recipe=Recipe(
        pipeline=PipelineKind.TEXT_TO_IMAGE,
        base_weights="Qwen/Qwen-Image",
        scheduler=SchedulerKind.LIGHTNING,
        lightning=LoraSource(LIGHTNING_REPO, "Qwen-Image-Lightning-8steps-V2.0.safetensors"),
        native_sizes=QWEN_IMAGE_SIZES,
    ),
)

QWEN_IMAGE_2512 = ModelSpec(
    slug="qwen-image-2512",
    title="Qwen Image 2512",
    summary="Photorealistic text-to-image (Qwen-Image-2512 + Lightning), explicit width/height.",
    price_usd=0.05,
    params=(
        Param("prompt", "string", "Text prompt describing the desired image", required=True),
        Param("base_64", "boolean", "Return image as base64 encoded string", default=False),
        Param(
            "height",
            "integer",
            "Output image height in pixels",
            default=1024,
            minimum=256,
            maximum=2048,
        ),
        Param(
            "image_format",
            "string",
            "Output image format",
            default="webp",
            allowed=IMAGE_FORMATS_JPEG_FIRST,
        ),
        Param(
            "quality", "integer", "Output image quality (1-100)", default=90, minimum=1, maximum=100
        ),
        Param(
            "seed",
            "integer",
            "Random seed for reproducibility. Use -1 for random",
            default=-1,
            minimum=-1,
            maximum=92147483647,
        ),
        Param("steps", "integer", "Number of inference steps", default=6, minimum=1, maximum=75),
        Param(
            "width",
            "integer",
            "Output image width in pixels",
            default=1024,
            minimum=256,
            maximum=2048,
        ),
    ),
    recipe=Recipe(
        pipeline=PipelineKind.TEXT_TO_IMAGE,
        base_weights="Qwen/Qwen-Image-2512",
        scheduler=SchedulerKind.LIGHTNING,
        lightning=LoraSource(
            "lightx2v/Qwen-Image-2512-Lightning",
            "Qwen-Image-2512-Lightning-4steps-V1.0-bf16.safetensors",
        ),
        native_sizes=QWEN_IMAGE_SIZES,
    ),
)

QWEN_IMAGE_EDIT_FAST = ModelSpec(
    slug="qwen-image-edit-fast",
    title="Qwen Image Edit Fast",
    summary="Edits one image from an instruction (Qwen-Image-Edit + Lightning, 8 steps).",
    price_usd=0.03,
    params=(
        Param(
            "image",
            "uri",
            "Input Image URL or file reference.",
            required=True,
        ),
        Param("prompt", "string", "Describes what to edit in the image.", required=True),
        Param(
            "steps",
            "integer",
            "Defines the precision of editing.",
            required=True,
            default=8,
            minimum=1,
            maximum=20,
        ),
        Param("base64", "boolean", "Outputs image as text.", default=False),
        Param(
            "guidance",
            "number",
            "Controls adherence to prompt.",
            default=1,
            minimum=1,
            maximum=25,
        ),
        Param(
            "image_format",
            "string",
            "Choose format for image storage.",
            default="png",
            allowed=IMAGE_FORMATS_PNG_FIRST,
        ),
        Param(
            "quality", "integer", "Sets image detail level.", default=90, minimum=10, maximum=100
        ),
        Param(
            "seed",
            "integer",
            "Ensures reproducibility of edits. Use -1 for random creative results.",
            default=760941192,
            minimum=-1,
            maximum=999999999999999,
        ),
    ),
    recipe=Recipe(
        pipeline=PipelineKind.EDIT,
        base_weights="Qwen/Qwen-Image-Edit",
        scheduler=SchedulerKind.LIGHTNING,
        lightning=LoraSource(
            LIGHTNING_REPO, "Qwen-Image-Edit-Lightning-8steps-V1.0-bf16.safetensors"
        ),
        max_input_images=1,
        max_prompt_tokens=EDIT_PROMPT_TOKENS,
    ),
)

PRODUCT_PHOTOGRAPHY_LORA = LoraSource(
    "dx8152/Qwen-Image-Edit-2509-White_to_Scene",
    "白底图转场景.safetensors",
    trigger="白底图转场景,",
)

QWEN_IMAGE_EDIT_PLUS_PRODUCT_PHOTOGRAPHY = ModelSpec(
    slug="qwen-image-edit-plus-product-photography",
    title="Qwen Image Edit Plus Product Photography",
    summary="Places white-background products into scenes (Qwen-Image-Edit-2509, 1-3 images).",
    price_usd=0.06,
    params=(
        Param(
            "prompt",
            "string",
            "Text prompt describing the desired image edit or generation",
            required=True,
        ),
        Param(
            "aspect_ratio",
            "string",
            "Output image aspect ratio",
            default="match_input_image",
            allowed=EDIT_PLUS_ASPECT_RATIOS,
        ),
        Param("base64", "boolean", "Return image as base64 encoded string", default=False),
        Param("image_1", "uri", "Primary input image (URL or base64)", default=None),
        Param("image_2", "uri", "Secondary input image (URL or base64)", default=None),
        Param("image_3", "uri", "Tertiary input image (URL or base64)", default=None),
        Param(
            "image_format",
            "string",
            "Output image format",
            default="webp",
            allowed=IMAGE_FORMATS_JPEG_FIRST,
        ),
        Param(
            "lora",
            "string",
            "Pre-configured LoRA model to apply",
            default="product_photography",
            allowed=("product_photography",),
        ),
        *extra_lora_params(),
        Param(
            "quality", "integer", "Output image quality (1-100)", default=95, minimum=1, maximum=100
        ),
        Param(
            "seed",
            "integer",
            "Random seed for reproducibility. Use -1 for random",
            default=None,
            minimum=-1,
            maximum=2147483647,
        ),
    ),
    recipe=Recipe(
        pipeline=PipelineKind.EDIT_PLUS,
        base_weights="Qwen/Qwen-Image-Edit-2509",
        scheduler=SchedulerKind.LIGHTNING,
        lightning=LoraSource(
            LIGHTNING_REPO,
            "Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors",
        ),
        preset_loras=MappingProxyType({"product_photography": PRODUCT_PHOTOGRAPHY_LORA}),
        default_steps=8,
        max_input_images=3,
        max_prompt_tokens=EDIT_PROMPT_TOKENS,
    ),
)

ALL_MODELS: tuple[ModelSpec, ...] = (
    QWEN_IMAGE,
    QWEN_IMAGE_FAST,
    QWEN_IMAGE_2512,
    QWEN_IMAGE_EDIT_FAST,
    QWEN_IMAGE_EDIT_PLUS_PRODUCT_PHOTOGRAPHY,
    *QWEN_IMAGE_21_MODELS,
)

MODELS: Mapping[str, ModelSpec] = MappingProxyType({m.slug: m for m in ALL_MODELS})

__all__ = ["ALL_MODELS", "MODELS", "NO_DEFAULT", "SEED_CEILING"]
