"""Building the diffusers call for 1..n requests that share one pipeline call.

Everything a call's arguments depend on is decided here: the prompts (a preset's trigger word
first) and negatives, text embeddings from the prompt cache where it applies, one seeded CPU
generator per request (so each image is the one it would get alone), the size plan, the
scheduler, VAE tiling and the input images. Adapters are set before (``adapters.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from qwenserve.catalog import GenerationRequest, PipelineKind, Recipe
from qwenserve.errors import InferenceError, InvalidInput
from qwenserve.runtime.fast_paths import set_vae_tiling
from qwenserve.runtime.memory_plan import prefix_kv_cache_bytes, reference_tokens
from qwenserve.runtime.prompt_cache import PromptCache
from qwenserve.runtime.resident import Pipeline, Resident
from qwenserve.runtime.schedulers import scheduler_for
from qwenserve.runtime.sizes import SizePlan, plan_size

MAX_SEQUENCE_LENGTH = 1024
"""Prompt tokens kept (the pipelines refuse more; longer prompts are truncated)."""


@dataclass(frozen=True)
class PreparedCall:
    """The exact diffusers call ``generate`` makes (for benchmarks and debugging)."""

    pipeline: Pipeline
    kwargs: dict[str, Any]
    size: SizePlan


def prompt_for(request: GenerationRequest, recipe: Recipe) -> str:
    """The prompt sent: a preset LoRA's trigger word goes first."""
    if request.lora is None:
        return request.prompt
    preset = recipe.preset_loras.get(request.lora)
    if preset is None:
        raise InvalidInput(f"unknown preset LoRA {request.lora!r}", field="lora")
    return f"{preset.trigger}{request.prompt}" if preset.trigger else request.prompt


def check_prompt_tokens(
    pipe: Pipeline, recipe: Recipe, texts: Sequence[str], negatives: Sequence[str]
) -> None:
    """Refuse a prompt (or negative prompt) longer than the pipeline takes, counted by its own
    tokenizer (``Recipe.max_prompt_tokens``; the catalog says why the edit pipelines have one),
    before any compute: past it they fail inside the transformer with a shape error.

    Raises InvalidInput naming ``prompt`` (or ``negative_prompt``)."""
    limit = recipe.max_prompt_tokens
    if limit is None:
        return
    for field, values in (("prompt", texts), ("negative_prompt", negatives)):
        for text in values:
            count = len(pipe.tokenizer(text, add_special_tokens=False)["input_ids"])
            if count > limit:
                raise InvalidInput(
                    f"{field} is {count} tokens long; this model takes at most {limit} "
                    "(roughly that many Chinese characters, or 4 times as many English ones)",
                    field=field,
                )


def negative_for(request: GenerationRequest) -> str:
    """The negative prompt sent with CFG on."""
    # True CFG runs only with a negative prompt; " " is what the official examples send.
    negative = request.negative_prompt
    return negative if negative and negative.strip() else " "


def call_kwargs(
    requests: Sequence[GenerationRequest],
    recipe: Recipe,
    images: Sequence[Image.Image],
    plan: SizePlan,
    pipe: Pipeline,
    prompts: PromptCache | None,
) -> dict[str, Any]:
    """The pipeline arguments for ``requests`` (one, or a batch sharing a batch key).

    ``prompts``: the prompt cache, or None when it is off (prompts are then sent as text)."""
    first = requests[0]
    if recipe.pipeline is PipelineKind.QWEN_IMAGE_21:
        return qwen_image_21_kwargs(requests, recipe, images, plan, pipe)
    texts = [prompt_for(r, recipe) for r in requests]
    generators = [torch.Generator(device="cpu").manual_seed(r.seed) for r in requests]
    single = len(requests) == 1
    kwargs: dict[str, Any] = {
        "num_inference_steps": first.steps,
        "width": plan.generate_width,
        "height": plan.generate_height,
        "generator": generators[0] if single else generators,
        "output_type": "np",
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "true_cfg_scale": first.guidance if first.guidance > 1.0 else 1.0,
    }
    cfg = first.guidance > 1.0
    negatives = [negative_for(r) for r in requests] if cfg else []
    check_prompt_tokens(pipe, recipe, texts, negatives)
    if recipe.pipeline is PipelineKind.TEXT_TO_IMAGE and prompts is not None:
        embeds, mask = prompts.encode(pipe, recipe.base_weights, texts, MAX_SEQUENCE_LENGTH)
        kwargs["prompt_embeds"], kwargs["prompt_embeds_mask"] = embeds, mask
        if cfg:
            embeds, mask = prompts.encode(pipe, recipe.base_weights, negatives, MAX_SEQUENCE_LENGTH)
            kwargs["negative_prompt_embeds"] = embeds
            kwargs["negative_prompt_embeds_mask"] = mask
    else:
        kwargs["prompt"] = texts[0] if single else texts
        if cfg:
            kwargs["negative_prompt"] = negatives[0] if single else negatives
    if recipe.pipeline is PipelineKind.EDIT:
        if len(images) != 1:
            raise InvalidInput("this model edits exactly one image", field="image")
        kwargs["image"] = images[0]
    elif recipe.pipeline is PipelineKind.EDIT_PLUS:
        if not 1 <= len(images) <= max(recipe.max_input_images, 1):
            raise InvalidInput(
                f"this model takes 1 to {recipe.max_input_images} images", field="image_1"
            )
        kwargs["image"] = list(images)
    return kwargs


def qwen_image_21_kwargs(
    requests: Sequence[GenerationRequest],
    recipe: Recipe,
    images: Sequence[Image.Image],
    plan: SizePlan,
    pipe: Pipeline,
) -> dict[str, Any]:
    """``QwenImage21Pipeline``'s arguments: prompts as text (its embeddings carry the references'
    vision tokens, so the prompt cache does not apply), the references as its condition images
    (one set per call: a batch is text-to-image only), the planned size, ``output_resolution``
    from the recipe's reference area, the KV cache always on (the pipeline documents that the
    flag changes the pixels, so fixing it keeps a seed's image), and explicit ``sigmas`` whenever
    the checkpoint's own ``sample_sigmas`` would override the requested step count (never for a
    fixed-grid checkpoint: ``step_sigmas``)."""
    first = requests[0]
    single = len(requests) == 1
    if len(images) > recipe.max_input_images:
        raise InvalidInput(
            f"this model takes at most {recipe.max_input_images} reference images",
            field=f"image_{recipe.max_input_images + 1}",
        )
    if images and not single:
        raise InvalidInput("reference images are one set per call: no batch", field="image_1")
    texts = [prompt_for(r, recipe) for r in requests]
    generators = [torch.Generator(device="cpu").manual_seed(r.seed) for r in requests]
    cfg = first.guidance > 1.0
    kwargs: dict[str, Any] = {
        "prompt": texts[0] if single else texts,
        "num_inference_steps": first.steps,
        "width": plan.generate_width,
        "height": plan.generate_height,
        "generator": generators[0] if single else generators,
        "output_type": "np",
        "true_cfg_scale": first.guidance if cfg else 1.0,
        "use_kv_cache": True,
        "output_resolution": reference_side(recipe, plan),
    }
    if cfg:
        negatives = [negative_for(r) for r in requests]
        kwargs["negative_prompt"] = negatives[0] if single else negatives
    if images:
        kwargs["image"] = list(images)
    sigmas = step_sigmas(pipe, first.steps, recipe)
    if sigmas is not None:
        kwargs["sigmas"] = sigmas
    return kwargs


def reference_side(recipe: Recipe, plan: SizePlan) -> int:
    """``output_resolution``: the side of the square the references are resized to (in area),
    the recipe's reference area or the output's, whichever is smaller, a multiple of 32."""
    area = plan.generate_width * plan.generate_height
    if recipe.reference_area is not None:
        area = min(area, recipe.reference_area)
    multiple = recipe.size_multiple
    return max(multiple, round(math.sqrt(area) / multiple) * multiple)


def step_sigmas(pipe: Pipeline, steps: int, recipe: Recipe) -> list[float] | None:
    """The pipeline's default schedule for ``steps`` where the checkpoint's ``sample_sigmas``
    (whose length, not ``num_inference_steps``, would set the steps) do not have that length;
    None (the pipeline's own choice) otherwise.

    With ``recipe.fixed_sigma_grid`` (Qwen-Image-2.1-Turbo) the checkpoint's grid is the only
    schedule its weights sample, so it is never overridden (always None); a checkpoint without
    one, or with one of another length than the ``steps`` the catalog runs, is not the checkpoint
    the slug describes. Raises InferenceError then, naming it."""
    configured = getattr(pipe.config, "sample_sigmas", None)
    if recipe.fixed_sigma_grid:
        if not configured or len(configured) != steps:
            found = f"{len(configured)} sigmas" if configured else "none"
            raise InferenceError(
                f"{recipe.base_weights} must carry a {steps}-step sample_sigmas grid in its "
                f"model_index.json (found {found}): these are not its weights"
            )
        return None
    if not configured or len(configured) == steps:
        return None
    return [float(s) for s in np.linspace(1.0, 1.0 / steps, steps)]


def use_scheduler(resident: Resident, recipe: Recipe, steps: int) -> None:
    """Set the recipe's scheduler on the pipeline, one kept per (kind, one step) and reused:
    building one per call would cost more than the call's own ``set_timesteps``."""
    one_step = steps <= 1
    scheduler = resident.schedulers.get((recipe.scheduler, one_step))
    if scheduler is None:
        scheduler = scheduler_for(recipe.scheduler, steps, resident.stock_scheduler)
        resident.schedulers[(recipe.scheduler, one_step)] = scheduler
    if resident.pipe.scheduler is not scheduler:
        resident.pipe.scheduler = scheduler


def build_call(
    resident: Resident,
    recipe: Recipe,
    requests: Sequence[GenerationRequest],
    images: Sequence[Image.Image],
    *,
    tiny: bool,
    prompts: PromptCache | None,
    vae_tiling: Callable[[int, int, int, int], bool],
) -> tuple[dict[str, Any], SizePlan]:
    """Scheduler, VAE tiling and arguments for one call (adapters are already active).

    ``tiny``: plan the tiny preset's sizes; ``vae_tiling(width, height, batch, held_bytes)``:
    whether the decode should be tiled (the memory plan's answer), the call holding
    ``held_bytes`` through it (2.1's prefix KV cache)."""
    first = requests[0]
    use_scheduler(resident, recipe, first.steps)
    plan = plan_size(first, recipe, [i.size for i in images], tiny=tiny)
    kwargs = call_kwargs(requests, recipe, images, plan, resident.pipe, prompts)
    held = prefix_cache_bytes(resident.pipe, kwargs, images, len(requests))
    tiled = vae_tiling(plan.generate_width, plan.generate_height, len(requests), held)
    set_vae_tiling(resident.pipe, tiled)
    return kwargs, plan


TEMPLATE_TOKENS = 32
"""About the tokens 2.1's prompt template adds around a prompt (system turn, markers)."""


def reference_size(side: int, size: tuple[int, int]) -> tuple[int, int]:
    """The size 2.1's pipeline resizes a reference of ``size`` to: ``side``² pixels at its
    ratio, both sides rounded to multiples of 32 (its ``calculate_dimensions``)."""
    ratio = size[0] / max(size[1], 1)
    width = math.sqrt(side * side * ratio)
    return round(width / 32) * 32, round(width / ratio / 32) * 32


def prefix_cache_bytes(
    pipe: Pipeline, kwargs: dict[str, Any], images: Sequence[Image.Image], batch: int
) -> int:
    """Bytes of the prefix KV cache a Qwen-Image 2.1 call keeps (text and references); 0 for
    the other pipelines and without the cache."""
    if not kwargs.get("use_kv_cache"):
        return 0
    prompts = kwargs["prompt"] if isinstance(kwargs["prompt"], list) else [kwargs["prompt"]]
    tokenizer = pipe.processor.tokenizer
    text = max(len(tokenizer(p)["input_ids"]) for p in prompts) + TEMPLATE_TOKENS
    side = int(kwargs["output_resolution"])
    references = reference_tokens([reference_size(side, image.size) for image in images])
    config = pipe.transformer.config
    return prefix_kv_cache_bytes(
        layers=int(config.num_layers),
        inner_dim=int(config.num_attention_heads) * int(config.attention_head_dim),
        prefix_tokens=text + references,
        batch=batch,
        dtype_bytes=int(pipe.transformer.dtype.itemsize),
        cfg=float(kwargs.get("true_cfg_scale", 1.0)) > 1.0 and "negative_prompt" in kwargs,
    )
