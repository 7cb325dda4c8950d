"""The tiny preset's Qwen-Image 2.1: ``QwenImage21Pipeline`` with small random weights.

Same classes as the real checkpoint (``QwenImage21Transformer2DModel``,
``AutoencoderKLQwenImage21``, ``Qwen3VLForConditionalGeneration`` and a Qwen3-VL processor), built
deterministically from fixed seeds and saved/loaded like the other tiny bases
(``tiny_preset.ensure_tiny_base``). What the pipeline depends on keeps the real shapes: 64 latent
channels, a 16x RGBA VAE (five levels), unpatched latents, Qwen3-VL's 16-pixel vision patches merged
2x2 (so one vision token is one 2x2 group of latent tokens, as the transformer requires).

Qwen-Image-2.1-Turbo is built as the real one is published: 2.1's text encoder and VAE (drawn
from 2.1's seed, so the saved files are byte-identical and the runtime shares them by content
hash), its own transformer (drawn from its own seed), and a fixed 8-sigma ``sample_sigmas`` grid
in ``model_index.json``. Its scheduler does not shift, so the sigmas it samples are the grid
itself (a test reads them back); the real checkpoint's scheduler config is loaded from its folder.

The tokenizer is the preset's locally built byte-level BPE (``tiny_tokenizer``): 2.1 derives its
template drop from the chat template instead of hard-coding it, so any tokenizer with Qwen's special
tokens and a chat template that renders a system turn as Qwen's does is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    AutoencoderKLQwenImage21,
    FlowMatchEulerDiscreteScheduler,
    QwenImage21Pipeline,
    QwenImage21Transformer2DModel,
)
from transformers import Qwen2Tokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from qwenserve.catalog.models_21 import QWEN_IMAGE_21_BASE, QWEN_IMAGE_21_TURBO
from qwenserve.runtime.processor import ImageOnlyQwen3VLProcessor
from qwenserve.runtime.tiny_tokenizer import IM_END, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

TEXT_HIDDEN = 32
LATENT_CHANNELS = 64
VISION_PATCH = 16
VISION_MIN_PIXELS = 32 * 32
VISION_MAX_PIXELS = 4096 * 4096
"""Wide open on purpose: the pipeline resizes each reference to a multiple of 32 itself, and the
vision token count must then equal the reference's latent slots, so the processor must not resize
again (the real Qwen3-VL processor's bounds are as wide)."""

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen's chat format for text turns: what the pipeline needs to count its system prefix."""

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
"""The flow-matching Euler scheduler with the dynamic shift the pipeline computes ``mu`` for
(its ``calculate_shift`` defaults); the real checkpoint's own config is loaded from its folder."""

TURBO_SAMPLE_SIGMAS: tuple[float, ...] = (1.0, 0.97, 0.92, 0.85, 0.74, 0.58, 0.38, 0.16)
"""The tiny Turbo's fixed grid (terminal sigma excluded): 8 steps, unlike ``linspace(1, 1/8)``
so a test can tell which one ran; its length is the catalog's ``TURBO_STEPS``."""

TURBO_SCHEDULER_CONFIG: dict[str, Any] = {**SCHEDULER_CONFIG, "use_dynamic_shifting": False}
"""No shift (``shift`` 1, not dynamic): the scheduler samples the grid as it is."""

SHARED_PARTS_OF: dict[str, str] = {QWEN_IMAGE_21_TURBO: QWEN_IMAGE_21_BASE}
"""Checkpoint → the one whose text encoder and VAE it ships byte for byte."""


def text_encoder_21(
    tokenizer: Qwen2Tokenizer,
    *,
    hidden: int = TEXT_HIDDEN,
    heads: int = 2,
    key_value_heads: int = 1,
    head_dim: int = 16,
    mrope_section: tuple[int, int, int] = (2, 3, 3),
) -> Any:
    """A two-layer Qwen3-VL whose special-token ids are the local tokenizer's; ``hidden`` is the
    width the transformer's text input expects (random-full widens it to the real 4096)."""
    names = (IM_END, IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END)
    ids: dict[str, int] = {t: tokenizer.convert_tokens_to_ids(t) for t in names}  # type: ignore[misc]
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 2 * TEXT_HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": key_value_heads,
            "head_dim": head_dim,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": list(mrope_section),  # sums to head_dim / 2
                "mrope_interleaved": True,
            },
            "bos_token_id": ids[IM_END],
            "eos_token_id": ids[IM_END],
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 2,
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 2 * TEXT_HIDDEN,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "patch_size": VISION_PATCH,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
    )
    return Qwen3VLForConditionalGeneration(config)


def transformer_21() -> Any:
    return QwenImage21Transformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=TEXT_HIDDEN,
        mlp_ratio=3,
        axes_dims_rope=(4, 6, 6),  # sums to the head dim, as the real (16, 56, 56) does
    )


def vae_21() -> Any:
    return AutoencoderKLQwenImage21(
        base_dim=4,
        decoder_base_dim=4,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True, True],  # four levels: the real 16x factor
        latents_mean=[0.0] * LATENT_CHANNELS,
        latents_std=[1.0] * LATENT_CHANNELS,
    )


def processor_21(tokenizer: Qwen2Tokenizer) -> ImageOnlyQwen3VLProcessor:
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=VISION_MIN_PIXELS,
        max_pixels=VISION_MAX_PIXELS,
        patch_size=VISION_PATCH,
        temporal_patch_size=2,
        merge_size=2,
    )
    return ImageOnlyQwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )


def assemble_pipeline_21(
    transformer: Any, vae: Any, text_encoder: Any, tokenizer: Qwen2Tokenizer, *, turbo: bool = False
) -> Any:
    """A ``QwenImage21Pipeline`` from its models and the tiny processor and scheduler; with
    ``turbo``, Turbo's fixed grid and unshifted scheduler."""
    config = TURBO_SCHEDULER_CONFIG if turbo else SCHEDULER_CONFIG
    return QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(dict(config)),
        vae=vae,
        text_encoder=text_encoder,
        processor=processor_21(tokenizer),
        transformer=transformer,
        sample_sigmas=list(TURBO_SAMPLE_SIGMAS) if turbo else None,
    )


def build_pipeline_21(
    name: str,
    tokenizer: Qwen2Tokenizer,
    seed_for: Callable[[str], int],
    reinitialise: Any,
    transformer_gain: float,
    vae_gain: float,
) -> Any:
    """The tiny pipeline for checkpoint ``name``, its weights depending only on ``name``:
    Turbo's text encoder and VAE are drawn exactly as 2.1's (``SHARED_PARTS_OF``), its
    transformer from its own seed. Changes torch's RNG (the caller forks it)."""
    parts_of = SHARED_PARTS_OF.get(name, name)
    torch.manual_seed(seed_for(parts_of))
    transformer, vae, text_encoder = build_models_21(
        tokenizer, reinitialise, transformer_gain, vae_gain
    )
    if parts_of == name:
        return assemble_pipeline_21(transformer, vae, text_encoder, tokenizer)
    torch.manual_seed(seed_for(name))
    transformer = transformer_21()
    reinitialise(transformer, transformer_gain)
    return assemble_pipeline_21(transformer, vae, text_encoder, tokenizer, turbo=True)


def build_models_21(
    tokenizer: Qwen2Tokenizer, reinitialise: Any, transformer_gain: float, vae_gain: float
) -> tuple[Any, Any, Any]:
    """(transformer, vae, text encoder), drawn from torch's current RNG (the caller seeds it)."""
    transformer = transformer_21()
    reinitialise(transformer, transformer_gain)
    vae = vae_21()
    reinitialise(vae, vae_gain)
    return transformer, vae, text_encoder_21(tokenizer)


def transformer_class(class_name: str) -> Any:
    """The transformer class a saved folder's config names (LoRA targets are read from it)."""
    if class_name == QwenImage21Transformer2DModel.__name__:
        return QwenImage21Transformer2DModel
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel
