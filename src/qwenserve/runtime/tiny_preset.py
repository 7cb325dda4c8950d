"""The tiny preset: Qwen-Image-architecture pipelines with small random weights, built locally.

Each base is built once, deterministically (fixed seeds), with the same diffusers and transformers
classes as the real checkpoints, saved with ``save_pretrained`` under
``<cache_dir>/tiny-v1/<org>/<name>`` and from then on loaded through the very ``from_pretrained``
path real weights take, so the preset exercises the real save/load code. Lightning and preset
LoRAs are small random safetensors files in diffusers' own key format, stored next to the bases
at ``<cache_dir>/tiny-v1/<repo>/<filename>``, exactly where a weights folder keeps real ones.

Qwen-Image 2.1 (``QwenImage21Pipeline``) is built by tiny_preset_21.py, saved the same way.

The images are noise: the point is a real pipeline end to end on a laptop CPU in a second.
Concurrent builders (threads or processes) serialise on a file lock, and every result appears by
an atomic rename, so a half-written folder is never visible.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from safetensors.torch import save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from qwenserve.catalog import LoraSource, PipelineKind
from qwenserve.runtime.processor import ImageOnlyQwen2VLProcessor, restore_stock_class_names
from qwenserve.runtime.progress import quiet_progress
from qwenserve.runtime.schedulers import STOCK_SCHEDULER_CONFIG
from qwenserve.runtime.tiny_preset_21 import build_pipeline_21, transformer_class
from qwenserve.runtime.tiny_tokenizer import (
    IM_END,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    PromptTemplate,
    build_tiny_tokenizer,
)

PRESET_NAME = "tiny-v1"
"""Bump when the architecture below changes, so old caches are not reused."""

# Sizes: small enough for a CPU, shaped like the real model where the pipelines depend on it
# (16 latent channels, an 8x VAE, 2x2 patches, Qwen2-VL's 14-pixel patches merged 2x2).
TEXT_HIDDEN = 32
LATENT_CHANNELS = 16
VISION_MAX_PIXELS = 64 * 28 * 28
VISION_MIN_PIXELS = 4 * 28 * 28
LORA_RANK = 4
TRANSFORMER_INIT_GAIN = 2.0
VAE_INIT_GAIN = 1.0

_PIPELINE_CLASSES: dict[PipelineKind, Any] = {
    PipelineKind.TEXT_TO_IMAGE: QwenImagePipeline,
    PipelineKind.EDIT: QwenImageEditPipeline,
    PipelineKind.EDIT_PLUS: QwenImageEditPlusPipeline,
}

_build_lock = threading.Lock()


def preset_root(cache_dir: Path) -> Path:
    """Where the tiny preset lives: a weights folder laid out like a real one."""
    return cache_dir / PRESET_NAME


def _seed_for(name: str) -> int:
    """A fixed seed per artefact, so each base and LoRA is random but always the same."""
    return zlib.crc32(name.encode("utf-8"))


def prompt_templates() -> list[PromptTemplate]:
    """The prompt templates of the installed pipeline classes, with their drop counts."""
    templates = []
    for cls in _PIPELINE_CLASSES.values():
        # The templates are set in __init__; an empty pipeline is enough to read them.
        empty: dict[str, Any] = {
            "scheduler": None,
            "vae": None,
            "text_encoder": None,
            "tokenizer": None,
            "transformer": None,
        }
        if cls is not QwenImagePipeline:
            empty["processor"] = None
        pipe: Any = cls(**empty)
        templates.append(
            PromptTemplate(pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx)
        )
    return templates


def _text_encoder(
    tokenizer: Qwen2Tokenizer,
    *,
    hidden: int = TEXT_HIDDEN,
    head_dim: int = 16,
    key_value_heads: int = 1,
    mrope_section: tuple[int, int, int] = (2, 3, 3),
) -> Any:
    """A two-layer Qwen2.5-VL; ``hidden`` is the width the transformer's text input expects."""
    names = (IM_END, IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END)
    ids: dict[str, int] = {t: tokenizer.convert_tokens_to_ids(t) for t in names}  # type: ignore[misc]
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 2 * TEXT_HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": hidden // head_dim,
            "num_key_value_heads": key_value_heads,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": list(mrope_section),  # sums to head_dim / 2, as Qwen2.5-VL's
            },
            "bos_token_id": ids[IM_END],
            "eos_token_id": ids[IM_END],
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 1,
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 2 * TEXT_HIDDEN,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _transformer() -> Any:
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=LATENT_CHANNELS * 4,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN,
        axes_dims_rope=(4, 6, 6),
    )


def _vae() -> Any:
    return AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # three levels: the real 8x spatial factor
        latents_mean=[0.0] * LATENT_CHANNELS,
        latents_std=[1.0] * LATENT_CHANNELS,
    )


def _reinitialise(module: torch.nn.Module, gain: float) -> None:
    """Weights ~ N(0, gain² / fan_in), biases 0, for every linear and convolution layer.

    PyTorch's default init shrinks the signal at every layer, so a random transformer barely
    reacts to its prompt and a random VAE decodes everything to flat grey: the tests could not
    see a prompt, CFG or a LoRA change anything. Variance-preserving weights (with some extra
    gain in the transformer) make every input visibly matter.
    """
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d | torch.nn.Conv3d):
                fan_in = layer.weight[0].numel()
                layer.weight.normal_(0.0, gain / fan_in**0.5)
                if layer.bias is not None:
                    layer.bias.zero_()


def build_tiny_pipeline(kind: PipelineKind, name: str) -> Any:
    """A fresh tiny pipeline of ``kind``; the weights depend only on ``name``."""
    tokenizer = build_tiny_tokenizer(prompt_templates())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_for(name))
        if kind is PipelineKind.QWEN_IMAGE_21:  # tiny_preset_21.py
            return build_pipeline_21(
                name, tokenizer, _seed_for, _reinitialise, TRANSFORMER_INIT_GAIN, VAE_INIT_GAIN
            )
        transformer = _transformer()
        _reinitialise(transformer, TRANSFORMER_INIT_GAIN)
        vae = _vae()
        _reinitialise(vae, VAE_INIT_GAIN)
        text_encoder = _text_encoder(tokenizer)
    return assemble_pipeline(kind, transformer, vae, text_encoder, tokenizer)


def assemble_pipeline(
    kind: PipelineKind, transformer: Any, vae: Any, text_encoder: Any, tokenizer: Any
) -> Any:
    """A pipeline of ``kind`` from its models, with the stock scheduler and, for edits, the
    torchvision-free image processor (shared by the tiny and random-full presets)."""
    components: dict[str, Any] = {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler.from_config(dict(STOCK_SCHEDULER_CONFIG)),
    }
    if kind is not PipelineKind.TEXT_TO_IMAGE:
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=VISION_MIN_PIXELS,
            max_pixels=VISION_MAX_PIXELS,
            patch_size=14,
            temporal_patch_size=2,
            merge_size=2,
        )
        components["processor"] = ImageOnlyQwen2VLProcessor(
            image_processor=image_processor, tokenizer=tokenizer
        )
    return _PIPELINE_CLASSES[kind](**components)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One builder at a time: across threads (a lock) and processes (flock on a file)."""
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock, open(root / ".build.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _publish(staging: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)


def _staging_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.building-{os.getpid()}-{threading.get_ident()}")


def ensure_tiny_base(cache_dir: Path, base_weights: str, kind: PipelineKind) -> Path:
    """The folder of the tiny stand-in for ``base_weights`` (an "org/name" id), built if needed."""
    root = preset_root(cache_dir)
    final = root / base_weights
    if (final / "model_index.json").exists():
        return final
    with _locked(root):
        if (final / "model_index.json").exists():
            return final
        staging = _staging_path(final)
        shutil.rmtree(staging, ignore_errors=True)
        pipe = build_tiny_pipeline(kind, base_weights)
        with quiet_progress():
            pipe.save_pretrained(staging)
        restore_stock_class_names(staging)
        _publish(staging, final)
    return final


def _lora_targets(base_folder: Path) -> dict[str, tuple[int, int]]:
    """Every linear layer of the transformer blocks: module name → (in, out) features."""
    config = json.loads((base_folder / "transformer" / "config.json").read_text())
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        transformer: Any = transformer_class(config.get("_class_name", ""))(**kwargs)
    return {
        name: (module.in_features, module.out_features)
        for name, module in transformer.named_modules()
        if name.startswith("transformer_blocks.") and isinstance(module, torch.nn.Linear)
    }


def tiny_lora_state_dict(base_folder: Path, name: str, *, strength: float = 1.0) -> dict[str, Any]:
    """A random rank-4 LoRA for the tiny transformer, in diffusers' key format."""
    generator = torch.Generator().manual_seed(_seed_for(name))
    tensors: dict[str, torch.Tensor] = {}
    for module, (in_features, out_features) in sorted(_lora_targets(base_folder).items()):
        down = torch.randn(LORA_RANK, in_features, generator=generator) / in_features**0.5
        up = torch.randn(out_features, LORA_RANK, generator=generator) * (0.5 * strength)
        tensors[f"transformer.{module}.lora_A.weight"] = down.contiguous()
        tensors[f"transformer.{module}.lora_B.weight"] = up.contiguous()
    return tensors


def ensure_tiny_lora(
    cache_dir: Path, source: LoraSource, base_weights: str, kind: PipelineKind
) -> Path:
    """The tiny stand-in for ``source``'s file, made for ``base_weights``'s transformer."""
    root = preset_root(cache_dir)
    final = root / source.repo / source.filename
    if final.exists():
        return final
    base_folder = ensure_tiny_base(cache_dir, base_weights, kind)
    with _locked(root):
        if final.exists():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = _staging_path(final)
        state = tiny_lora_state_dict(base_folder, f"{source.repo}/{source.filename}")
        save_file(state, str(staging), metadata={"format": "pt"})
        _publish(staging, final)
    return final
