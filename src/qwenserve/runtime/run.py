"""Running one diffusers call and checking what it returns.

The step callback reports progress and, on cancellation, leaves the pipeline call at that
step boundary (it raises: diffusers' ``_interrupt`` would still decode the discarded image,
seconds on a CPU, before the call returned); a VAE decode
that runs out of memory is retried tiled on the same latents (``decode_retry.py``: the
transformer does not run again); any other out-of-memory error (CUDA's, or the CPU allocator's)
becomes ``OutOfMemory`` naming the size and batch, raised only once the failed call's memory is
freed; NaN/inf output is refused; pixels
become an RGB (or, for a transparent Qwen-Image 2.1 image, RGBA) image of exactly the
planned size.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from qwenserve.errors import InferenceError, OutOfMemory, QwenServeError
from qwenserve.runtime.decode_retry import decode_retried_on_oom, is_out_of_memory
from qwenserve.runtime.resident import Pipeline
from qwenserve.runtime.sizes import SizePlan

log = logging.getLogger("qwenserve.runtime")


class _Cancelled(Exception):
    """Raised by the step callback to leave the pipeline call; becomes InferenceError."""


def run_pipeline(
    pipe: Pipeline,
    kwargs: dict[str, Any],
    plan: SizePlan,
    *,
    total_steps: int,
    on_step: Callable[[int, int], None] | None,
    should_cancel: Callable[[], bool] | None,
    on_latents: Callable[[int, Any], None] | None = None,
    scopes: Sequence[contextlib.AbstractContextManager[Any]] = (),
    free_memory: Callable[[], None],
    device_type: str,
) -> np.ndarray[Any, Any]:
    """Call ``pipe`` within ``scopes``; returns float pixels [B, H, W, C] in [0, 1] (C is 3, or
    4 for Qwen-Image 2.1's RGBA VAE).

    ``on_step`` gets (steps done, ``total_steps``) after each step; ``should_cancel`` is
    checked there; ``on_latents`` gets (steps done, the latents) after each step (previews).
    A decode out of memory is retried tiled (``free_memory`` runs first). Raises
    InferenceError ("cancelled", NaN output, any other failure) and OutOfMemory (naming size
    and batch) after ``free_memory`` ran."""
    cancelled = False
    out_of_memory = False

    def step_end(
        pipeline: Pipeline, step: int, timestep: Any, tensors: dict[str, Any]
    ) -> dict[str, Any]:
        if on_latents is not None and "latents" in tensors:
            on_latents(step + 1, tensors["latents"])
        if on_step is not None:
            on_step(step + 1, total_steps)
        if should_cancel is not None and should_cancel():
            raise _Cancelled  # no further step, no decode: the image would be discarded
        return {}

    try:
        with contextlib.ExitStack() as stack:
            for scope in scopes:
                stack.enter_context(scope)
            stack.enter_context(decode_retried_on_oom(pipe, free_memory))
            output = pipe(**kwargs, callback_on_step_end=step_end)
    except _Cancelled:
        cancelled = True  # raised below, once the call's frames are gone
    except QwenServeError:
        raise
    except Exception as error:
        if not is_out_of_memory(error):
            # The details are for the logs; a client reads a stable sentence.
            log.error("generation failed: %s: %s", type(error).__name__, error)
            raise InferenceError(
                "generation failed: the engine could not run this request"
            ) from error
        out_of_memory = True  # raised below: the error's frames hold the call's tensors
    if out_of_memory:
        free_memory()
        batch = len(kwargs["generator"]) if isinstance(kwargs["generator"], list) else 1
        raise OutOfMemory(
            f"out of memory generating {plan.width}x{plan.height} ×{batch} on {device_type}: "
            + ("retry in smaller batches" if batch > 1 else "try a smaller size")
        )
    if cancelled:
        raise InferenceError("cancelled")
    pixels: np.ndarray[Any, Any] = np.asarray(output.images)
    if pixels.ndim == 3:
        pixels = pixels[None]
    if not np.isfinite(pixels).all():
        raise InferenceError("the model produced NaN/inf values; the image was discarded")
    return pixels


def to_image(pixels: np.ndarray[Any, Any], plan: SizePlan) -> Image.Image:
    """Float [0, 1] HxWx3 (or HxWx4: Qwen-Image 2.1's RGBA VAE) → an image of exactly the
    planned size: center-cropped from a slightly larger one, or (tiny preset, large explicit
    sizes) resized from a smaller one. RGBA only where some pixel is not opaque (the model made
    a transparent image); an opaque one is RGB, as every other model's."""
    array = (np.clip(pixels, 0.0, 1.0) * 255).round().astype(np.uint8)
    transparent = array.ndim == 3 and array.shape[-1] == 4 and bool((array[..., 3] < 255).any())
    if array.ndim == 3 and array.shape[-1] == 4 and not transparent:
        array = np.ascontiguousarray(array[..., :3])
    image = Image.fromarray(array)
    image = image.convert("RGBA" if transparent else "RGB")
    if plan.needs_resize:
        return image.resize((plan.width, plan.height), Image.Resampling.BICUBIC)
    if image.size != (plan.width, plan.height):
        left = (image.width - plan.width) // 2
        top = (image.height - plan.height) // 2
        image = image.crop((left, top, left + plan.width, top + plan.height))
    return image
