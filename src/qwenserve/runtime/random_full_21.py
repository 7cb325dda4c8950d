"""random-full for Qwen-Image 2.1: the real transformer and VAE sizes with random weights.

``QwenImage21Transformer2DModel`` and ``AutoencoderKLQwenImage21`` at their class defaults, which
are the published configuration (32 single-stream blocks of 32 heads x 128, text width 4096, RoPE
axes 16/56/56: 7.1B parameters; the 64-channel RGBA VAE). The text encoder is the tiny preset's
two-layer Qwen3-VL widened to 4096 (Qwen3-VL-8B's width, 32 heads, 8 KV heads), so prompt
embeddings have the real shape at a fraction of the 8B encoder's cost. CUDA only; images are noise.
Qwen-Image-2.1-Turbo gets the tiny Turbo's 8-sigma grid, so it runs its 8 steps as the real one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderKLQwenImage21, QwenImage21Transformer2DModel

from qwenserve.runtime.random_full import _random_transformer
from qwenserve.runtime.tiny_preset import _seed_for, prompt_templates
from qwenserve.runtime.tiny_preset_21 import (
    SHARED_PARTS_OF,
    assemble_pipeline_21,
    text_encoder_21,
)
from qwenserve.runtime.tiny_tokenizer import build_tiny_tokenizer

TEXT_WIDTH = 4096


def wide_text_encoder_21(tokenizer: Any) -> Any:
    """The tiny two-layer Qwen3-VL at the real text width (real embedding shapes)."""
    return text_encoder_21(
        tokenizer,
        hidden=TEXT_WIDTH,
        heads=32,
        key_value_heads=8,
        head_dim=128,
        mrope_section=(24, 20, 20),
    )


def meta_components_21(tokenizer: Any) -> dict[str, Any]:
    """The components built on whatever device is current (the caller's meta device)."""
    return {
        "transformer": QwenImage21Transformer2DModel(),
        "vae": AutoencoderKLQwenImage21(),
        "text_encoder": wide_text_encoder_21(tokenizer),
    }


def build_random_full_21(
    name: str,
    dtype: torch.dtype,
    device: torch.device,
    mark: Callable[[str], None] = lambda _component: None,
) -> Any:
    """A real-size ``QwenImage21Pipeline`` with random weights on ``device``; ``mark(name)``
    after each component is built (the build stage's per-component times)."""
    tokenizer = build_tiny_tokenizer(prompt_templates())
    with torch.random.fork_rng(devices=[device]):
        torch.manual_seed(_seed_for(name))
        transformer = _random_transformer(device, dtype, QwenImage21Transformer2DModel)
        mark("transformer")
        vae_module: Any = AutoencoderKLQwenImage21()
        vae = vae_module.to(device=device, dtype=dtype)
        mark("vae")
        text_encoder = wide_text_encoder_21(tokenizer).to(device=device, dtype=dtype)
        mark("text_encoder")
    turbo = name in SHARED_PARTS_OF
    return assemble_pipeline_21(transformer, vae, text_encoder, tokenizer, turbo=turbo)
