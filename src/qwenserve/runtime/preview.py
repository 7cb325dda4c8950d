"""Cheap previews of an image while it denoises: latents → RGB by one linear projection.

A full VAE decode per preview would cost about as much as a denoising step at full size; this
costs a matrix product over the latent grid (1/8 of the image per side), upscaled to the output
size. The Qwen-Image VAE shares the Wan 2.1 latent space (16 channels), so the projection is
the 16x3 fit published for Wan 2.1 latent previews (ComfyUI's ``latent_formats.Wan21``),
applied to the normalised latents the denoising loop holds. The colours and contrast are
approximate: a preview shows composition and rough colour, never the final pixels. With random
weights (the tiny preset) previews are noise, as the images are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from qwenserve.catalog import GenerationRequest
from qwenserve.runtime.sizes import SizePlan

log = logging.getLogger("qwenserve.runtime")

LATENT_CHANNELS = 16

PreviewCallback = Callable[[int, int, Image.Image], None]
"""Called with (the request's index in the call, the preview's index, the preview image)."""

WAN21_LATENT_RGB = (
    (-0.1299, -0.1692, 0.2932),
    (0.0671, 0.0406, 0.0442),
    (0.3568, 0.2548, 0.1747),
    (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328),
    (0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925),
    (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364),
    (-0.1293, 0.0740, 0.1636),
    (0.0680, 0.3019, 0.1128),
    (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699),
    (0.0060, -0.0633, 0.0005),
    (0.3477, 0.2275, 0.2950),
    (0.1984, 0.0913, 0.1861),
)
"""Latent channel → (R, G, B) weights; the result is in about [-1, 1]."""
WAN21_LATENT_RGB_BIAS = (-0.1835, -0.0868, -0.3360)


def preview_steps(total_steps: int, count: int) -> tuple[int, ...]:
    """The steps (1-based, after which) ``count`` previews are made: evenly spaced, never
    the last step (that one is the image). Fewer than ``count`` when there are too few steps."""
    if count < 1 or total_steps < 2:
        return ()
    steps = {max(1, (j * total_steps) // (count + 1)) for j in range(1, count + 1)}
    return tuple(sorted(s for s in steps if s < total_steps))


def unpack_latents(packed: torch.Tensor, grid_height: int, grid_width: int) -> torch.Tensor:
    """Qwen-Image's packed latents [B, (h/2)*(w/2), C*4] (2x2 patches) → [B, C, h, w]."""
    batch, seq, packed_dim = packed.shape
    if seq != grid_height * grid_width or packed_dim % 4:
        raise ValueError(f"latents {tuple(packed.shape)} do not fit a {grid_height}x{grid_width}")
    channels = packed_dim // 4
    grid = packed.reshape(batch, grid_height, grid_width, channels, 2, 2)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, grid_height * 2, grid_width * 2)


def latents_to_rgb(latents: torch.Tensor) -> np.ndarray[Any, Any]:
    """[B, 16, h, w] normalised latents → uint8 [B, h, w, 3] by the linear projection (any
    other channel count, a test model's, shows its first three channels)."""
    values = latents.detach().float().cpu()
    if values.shape[1] == LATENT_CHANNELS:
        weights = torch.tensor(WAN21_LATENT_RGB)
        rgb = torch.einsum("bchw,cr->bhwr", values, weights) + torch.tensor(WAN21_LATENT_RGB_BIAS)
    else:
        rgb = values[:, :3].permute(0, 2, 3, 1)
        if rgb.shape[-1] < 3:
            rgb = rgb[..., :1].expand(*rgb.shape[:-1], 3)
    pixels = ((rgb.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.numpy()


def previews_from_latents(
    packed: torch.Tensor,
    *,
    generate_size: tuple[int, int],
    output_size: tuple[int, int],
    vae_scale_factor: int,
) -> list[Image.Image]:
    """One RGB preview per batch row, at ``output_size`` (width, height): the projection at
    latent resolution, upscaled (bilinear) and center-cropped like the final image."""
    width, height = generate_size
    patch = vae_scale_factor * 2
    latents = unpack_latents(packed, height // patch, width // patch)
    images = []
    for array in latents_to_rgb(latents):
        small = Image.fromarray(array, mode="RGB")
        images.append(_fit(small, output_size))
    return images


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Upscale to cover ``size`` and center-crop to it (the final image is cropped the same)."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    covered = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))),
        Image.Resampling.BILINEAR,
    )
    left, top = (covered.width - width) // 2, (covered.height - height) // 2
    return covered.crop((left, top, left + width, top + height))


def preview_hook(
    requests: Sequence[GenerationRequest],
    plan: SizePlan,
    pipe: Any,
    on_preview: PreviewCallback | None,
) -> Callable[[int, Any], None] | None:
    """The ``on_latents`` step hook that makes the previews ``requests`` ask for (each its
    ``partial_images`` at ``preview_steps``) and hands them to ``on_preview``; None when no
    request wants any. A preview that cannot be made is skipped, never the job's failure."""
    if on_preview is None or int(getattr(pipe, "vae_scale_factor", 8)) != 8:
        # Qwen-Image 2.1 (a 16x VAE, 64 unpatched channels) has no published latent projection.
        return None
    wanted = {
        index: preview_steps(request.steps, request.partial_images)
        for index, request in enumerate(requests)
        if request.partial_images > 0
    }
    if not any(wanted.values()):
        return None
    vae_scale_factor = int(getattr(pipe, "vae_scale_factor", 8))

    def on_latents(done: int, latents: Any) -> None:
        rows = [index for index, steps in wanted.items() if done in steps]
        if not rows:
            return
        try:
            images = previews_from_latents(
                latents[rows],
                generate_size=(plan.generate_width, plan.generate_height),
                output_size=(plan.width, plan.height),
                vae_scale_factor=vae_scale_factor,
            )
        except Exception:
            log.warning("no preview at step %d", done, exc_info=True)
            return
        for index, image in zip(rows, images, strict=True):
            on_preview(index, wanted[index].index(done), image)

    return on_latents
