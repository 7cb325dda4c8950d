"""The random-full preset: the real Qwen-Image transformer and VAE sizes with random weights.

For measuring real compute cost (seconds per step, memory) without the real checkpoints. The
transformer is ``QwenImageTransformer2DModel`` with its published configuration (the class
defaults in diffusers 0.42 are exactly that: 60 layers, 24 heads x 128, joint attention width
3584, RoPE axes 16/56/56), the VAE ``AutoencoderKLQwenImage`` likewise at its defaults (base
width 96). The text encoder is the tiny preset's two-layer Qwen2.5-VL widened to 3584, so
prompt embeddings have the real shape at a fraction of the 7B encoder's cost (its time is not
part of a denoising step; the full-size encoders are random_full_encoders.py). Images are noise.
CUDA only: 20B parameters in bfloat16 are 41 GB. Every buffer keeps its constructor's value
(``materialise``): ``to_empty`` would leave non-persistent ones (RoPE, timestep tables) garbage.
Qwen-Image 2.1's real-size build (7.1B transformer, RGBA VAE) is random_full_21.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLQwenImage
from diffusers import QwenImageTransformer2DModel as Transformer
from safetensors.torch import save_file

from qwenserve.catalog import LoraSource, PipelineKind
from qwenserve.errors import InferenceError
from qwenserve.runtime.memory_plan import Footprint, Part
from qwenserve.runtime.tiny_preset import (
    _seed_for,
    _text_encoder,
    assemble_pipeline,
    prompt_templates,
)
from qwenserve.runtime.tiny_tokenizer import build_tiny_tokenizer

JOINT_ATTENTION_DIM = 3584
INIT_STD = 0.02
"""Small random weights keep 60 residual blocks finite in bfloat16."""


def materialise(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Give ``module`` (parameters on the meta device, buffers real: ``init_empty_weights``)
    storage on ``device`` in ``dtype``, with random parameters and every buffer as its
    constructor made it.

    ``to_empty`` leaves buffers uninitialised as well as parameters: non-persistent ones
    (RoPE ``inv_freq``, Qwen-Image 2.1's timestep ``freqs``) are in no checkpoint, so garbage
    there (1.7e38 seen) turns into inf and NaN. They are copied back from the constructor's."""
    module.to(dtype)  # floating buffers too, as a real load at this dtype does
    buffers = {name: buffer.detach().clone() for name, buffer in module.named_buffers()}
    module.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.copy_(buffers[name])
        for name, parameter in module.named_parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0.0, INIT_STD)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.fill_(1.0)  # norm scales
    return module


def _random_transformer(
    device: torch.device, dtype: torch.dtype, cls: Any = Transformer, **config: Any
) -> Any:
    # Parameters start on the meta device (no 80 GB float32 copy anywhere); buffers and the
    # RoPE tables (plain tensors built in __init__) stay real. ``config``: a smaller build
    # (tests); the class defaults are the published configuration.
    with init_empty_weights(include_buffers=False):
        transformer: Any = cls(**config)
    return materialise(transformer, device, dtype)


def transformer_class_for(kind: PipelineKind) -> Any:
    """The real transformer class of ``kind`` (its class defaults are the published config)."""
    if kind is PipelineKind.QWEN_IMAGE_21:
        from diffusers import QwenImage21Transformer2DModel

        return QwenImage21Transformer2DModel
    return Transformer


def _wide_text_encoder(tokenizer: Any) -> Any:
    """The tiny two-layer encoder at the real joint attention width (real embedding shapes)."""
    return _text_encoder(
        tokenizer,
        hidden=JOINT_ATTENTION_DIM,
        head_dim=128,
        key_value_heads=4,
        mrope_section=(16, 24, 24),
    )


BUILD_SECONDS: dict[str, dict[str, float]] = {}
"""Seconds per component of the last random-full build of each base (``name``), read by the GPU
proof's build stage (bench/gpu_verify_core.py): the engine times only whole loads."""


class _ComponentClock:
    """Times each component of one build on ``device`` (synchronised: CUDA work is async)."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.seconds = BUILD_SECONDS.setdefault(name, {})
        self.seconds.clear()
        self.device = device
        self.last = time.perf_counter()

    def mark(self, component: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[component] = now - self.last
        self.last = now


def build_random_full_pipeline(kind: PipelineKind, name: str, dtype: torch.dtype) -> Any:
    """A real-size pipeline of ``kind`` with random weights, on CUDA (refused elsewhere)."""
    if not torch.cuda.is_available():
        raise InferenceError("random-full needs a CUDA GPU")
    device = torch.device("cuda")
    clock = _ComponentClock(name, device)
    if kind is PipelineKind.QWEN_IMAGE_21:
        from qwenserve.runtime.random_full_21 import build_random_full_21

        return build_random_full_21(name, dtype, device, clock.mark)
    tokenizer = build_tiny_tokenizer(prompt_templates())
    with torch.random.fork_rng(devices=[device]):
        torch.manual_seed(_seed_for(name))
        transformer = _random_transformer(device, dtype)
        clock.mark("transformer")
        vae_module: Any = AutoencoderKLQwenImage()
        vae = vae_module.to(device=device, dtype=dtype)
        clock.mark("vae")
        text_encoder = _wide_text_encoder(tokenizer).to(device=device, dtype=dtype)
        clock.mark("text_encoder")
    return assemble_pipeline(kind, transformer, vae, text_encoder, tokenizer)


def random_full_footprint(
    dtype: torch.dtype, kind: PipelineKind = PipelineKind.TEXT_TO_IMAGE
) -> Footprint:
    """The bytes ``build_random_full_pipeline`` will take, from a meta-device build (no memory,
    no GPU): the parameters and buffers of each component at ``dtype``."""
    tokenizer = build_tiny_tokenizer(prompt_templates())
    with torch.device("meta"):
        components: dict[str, Any]
        if kind is PipelineKind.QWEN_IMAGE_21:
            from qwenserve.runtime.random_full_21 import meta_components_21

            components = meta_components_21(tokenizer)
        else:
            components = {
                "transformer": Transformer(),
                "vae": AutoencoderKLQwenImage(),
                "text_encoder": _wide_text_encoder(tokenizer),
            }
    return Footprint(
        tuple(
            Part(name, sum(t.numel() for t in (*m.parameters(), *m.buffers())) * dtype.itemsize)
            for name, m in components.items()
        )
    )


LORA_RANK = 16


def ensure_random_full_lora(
    cache_dir: Path, source: LoraSource, kind: PipelineKind = PipelineKind.TEXT_TO_IMAGE
) -> Path:
    """A random rank-16 LoRA over every block linear of the real transformer of ``kind``
    (built once)."""
    final = cache_dir / "random-full-v1" / source.repo / source.filename
    if final.exists():
        return final
    with torch.device("meta"):
        transformer: Any = transformer_class_for(kind)()
    generator = torch.Generator().manual_seed(_seed_for(f"{source.repo}/{source.filename}"))
    tensors: dict[str, torch.Tensor] = {}
    for module_name, module in transformer.named_modules():
        if module_name.startswith("transformer_blocks.") and isinstance(module, torch.nn.Linear):
            down = torch.randn(LORA_RANK, module.in_features, generator=generator) * INIT_STD
            up = torch.randn(module.out_features, LORA_RANK, generator=generator) * INIT_STD
            tensors[f"transformer.{module_name}.lora_A.weight"] = down.to(torch.bfloat16)
            tensors[f"transformer.{module_name}.lora_B.weight"] = up.to(torch.bfloat16)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.building-{os.getpid()}")
    save_file(tensors, str(staging), metadata={"format": "pt"})
    os.replace(staging, final)
    return final
