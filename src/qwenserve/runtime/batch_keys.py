"""Which requests may share one pipeline call, decided from the request and the engine's
configuration alone (no torch): the worker's parent process asks this for every claimed job
while the engine runs in its own process (``worker/engine_process.py``), and ``Engine`` asks
the same functions, so both sides always agree."""

from __future__ import annotations

from collections.abc import Hashable

from qwenserve.catalog import (
    GenerationRequest,
    LoraSource,
    PipelineKind,
    Recipe,
    SchedulerKind,
    get_model,
)
from qwenserve.runtime.config import EngineConfig
from qwenserve.runtime.sizes import plan_size


def fused_lora(recipe: Recipe, config: EngineConfig) -> LoraSource | None:
    """The Lightning LoRA fused into ``recipe``'s own pipeline (``fuse_lightning``), or None."""
    if (
        config.fuse_lightning
        and recipe.scheduler is SchedulerKind.LIGHTNING
        and recipe.lightning is not None
    ):
        return recipe.lightning
    return None


def residency_key(recipe: Recipe, config: EngineConfig) -> str:
    """The base weights id; a fused-Lightning pipeline is its own entry."""
    fused = fused_lora(recipe, config)
    if fused is None:
        return recipe.base_weights
    return f"{recipe.base_weights}+{fused.filename}"


def prompt_batch_key(request: GenerationRequest, recipe: Recipe, cfg_scale: float) -> Hashable:
    """The prompts a batch must share: Qwen-Image 2.1's exact texts, None for the pipelines
    whose batches do not depend on them. 2.1's pipeline pads a shorter prompt's encoding, and a
    padded sample is not its solo image (up to 125 of 255 levels off on the tiny preset; equal
    token counts match to one level), so only the same prompt batches (the OpenAI API's ``n``
    images of one prompt)."""
    if recipe.pipeline is not PipelineKind.QWEN_IMAGE_21:
        return None
    return (request.prompt, request.negative_prompt if cfg_scale > 1.0 else None)


def batch_key(request: GenerationRequest, config: EngineConfig) -> Hashable | None:
    """Requests with equal non-None keys can run in one ``Engine.generate_batch`` call.

    None (never batched) for edit slugs (edit-plus refuses batches; one-image edit gains
    little, each prompt needing its own image), for Qwen-Image 2.1 requests with reference
    images (its pipeline takes one set per call) and for requests with extra LoRAs (their
    adapters are per job). The key holds everything one pipeline call shares: the slug and
    its recipe adapters, the preset LoRA, the planned size, steps, and the CFG scale (CFG
    on means a negative prompt is always sent, so its presence is implied by the scale).
    Qwen-Image 2.1 also keys on its prompts (``prompt_batch_key`` says why).
    """
    recipe = get_model(request.slug).recipe
    # Qwen-Image 2.1 batches prompts, but takes one set of reference images per call.
    batchable = recipe.pipeline is PipelineKind.TEXT_TO_IMAGE or (
        recipe.pipeline is PipelineKind.QWEN_IMAGE_21 and not request.images
    )
    if not batchable or request.extra_loras:
        return None
    plan = plan_size(request, recipe, [], tiny=config.weights == "tiny")
    cfg_scale = request.guidance if request.guidance > 1.0 else 1.0
    return (
        request.slug,
        residency_key(recipe, config),
        request.lora,
        (plan.generate_width, plan.generate_height, plan.width, plan.height),
        request.steps,
        cfg_scale,
        prompt_batch_key(request, recipe, cfg_scale),
    )
