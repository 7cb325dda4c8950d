"""The GPU fast paths of ``EngineConfig``, applied to a freshly loaded pipeline.

Each is a switch with a safe default. Order matters and is fixed here: weights are final (a
fused Lightning LoRA already in them) before fp8 quantisation, the step cache hooks the blocks
before compilation traces them, and placement (``.to(device)`` or CPU offload) comes last. With
fp8 the transformer arrives here on the CPU (``resident.py`` keeps it there): each linear layer
goes to the device only as torchao quantizes it, so the device never holds the full-precision
transformer (a 20B one: ~41 GB in bfloat16, ~20 GB once float8).
Switches that cannot work where the engine runs refuse at load with an ``InferenceError``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from qwenserve.errors import InferenceError
from qwenserve.runtime.compile import CompileStats, compile_blocks
from qwenserve.runtime.config import EngineConfig, QuantizeMode, quantize_mode

log = logging.getLogger("qwenserve.runtime")


def check_switches(config: EngineConfig, device: torch.device) -> None:
    """Refuse, before anything loads, switches that cannot work on ``device``."""
    if config.cpu_offload and device.type != "cuda":
        raise InferenceError(
            f"cpu_offload needs a CUDA GPU (this engine runs on {device.type}); turn it off"
        )
    mode = quantize_mode(config.quantize)  # raises InferenceError for an unknown value
    if mode != "none" and importlib.util.find_spec("torchao") is None:
        raise InferenceError(
            f"quantize={config.quantize} needs torchao, which is not installed: "
            "pip install 'qwenserve[gpu]'"
        )
    if mode == "fp8-speed":
        check_fp8_speed(device)
    if config.step_cache is not None and not config.step_cache > 0.0:
        raise InferenceError(f"step_cache must be a positive threshold, not {config.step_cache}")
    if config.prompt_cache_size < 0:
        raise InferenceError("prompt_cache_size must be 0 (off) or more")


FP8_SPEED_CAPABILITY = (8, 9)
"""float8 matmuls (``torch._scaled_mm``) need Ada or Hopper (compute capability 8.9 or more)."""


def check_fp8_speed(device: torch.device) -> None:
    """Refuse ``fp8-speed`` where float8 matmuls cannot run (before any weights load)."""
    if device.type != "cuda":
        raise InferenceError(
            f"quantize=fp8-speed needs a CUDA GPU with compute capability 8.9 or more (Ada, "
            f"Hopper); this engine runs on {device.type}: use fp8-memory or none"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_SPEED_CAPABILITY:
        raise InferenceError(
            f"quantize=fp8-speed needs compute capability 8.9 or more (Ada, Hopper); this GPU "
            f"has {capability[0]}.{capability[1]}: use fp8-memory or none"
        )


def fp8_config(mode: QuantizeMode) -> Any:
    """The torchao config for ``mode``: weight-only float8 halves the transformer's weight memory
    but dequantizes in every matmul (slower than bf16 where compute-bound); dynamic float8
    activations with per-row scales run the matmuls themselves in float8 (faster on Hopper)."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
    )

    if mode == "fp8-memory":
        return Float8WeightOnlyConfig()
    if mode == "fp8-speed":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    raise InferenceError(f"quantize mode {mode!r} has no fp8 config")


def quantize_fp8(
    transformer: torch.nn.Module, mode: QuantizeMode, device: torch.device | None = None
) -> None:
    """float8 quantisation of every linear layer of ``transformer``, in place (torchao); with
    ``device``, each layer is moved there just before it is quantized (one layer's full
    precision copy on the device at a time, never the whole transformer's)."""
    from torchao.quantization import quantize_

    quantize_(transformer, fp8_config(mode), device=device)


def enable_step_cache(transformer: Any, threshold: float) -> bool:
    """diffusers' first-block cache: skip the remaining blocks when block 0 barely changed.

    False (and the transformer left as it is) where diffusers has no first-block cache for its
    blocks: Qwen-Image 2.1's in diffusers 0.42 (it caches its prefix K/V itself)."""
    from diffusers import FirstBlockCacheConfig

    try:
        transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    except ValueError as error:
        if "not registered" not in str(error):
            raise
        log.warning("step cache not available for %s: %s", type(transformer).__name__, error)
        return False
    return True


def reset_step_cache(transformer: Any) -> None:
    """Drop the step cache's kept residuals. A call that ends normally does this itself
    (``maybe_free_model_hooks``); one that raises mid-way (OOM, cancel) would leave them for the
    next call, which then fails at another shape or reuses a stale residual at the same one."""
    from diffusers.hooks.hooks import HookRegistry

    if hasattr(transformer, "_diffusers_hook"):
        HookRegistry.check_if_exists_or_initialize(transformer).reset_stateful_hooks(recurse=True)


@contextmanager
def step_cache_reset_on_error(pipe: Any, config: EngineConfig) -> Iterator[None]:
    """Around a pipeline call: on an exception, reset the step cache's state (when it is on)."""
    try:
        yield
    except BaseException:
        if config.step_cache is not None:
            reset_step_cache(pipe.transformer)
        raise


def apply_fast_paths(
    pipe: Any,
    config: EngineConfig,
    device: torch.device,
    compile_stats: CompileStats | None = None,
) -> None:
    """Quantise, cache, compile and place ``pipe`` as ``config`` asks (compilations counted
    into ``compile_stats``)."""
    mode = quantize_mode(config.quantize)
    if mode != "none":
        quantize_fp8(pipe.transformer, mode, None if config.cpu_offload else device)
    if config.step_cache is not None:
        enable_step_cache(pipe.transformer, config.step_cache)
    if config.compile:
        # The step cache decides per step, on data, whether to skip blocks: a graph break.
        fullgraph = config.step_cache is None
        compile_blocks(pipe.transformer, compile_stats or CompileStats(), fullgraph=fullgraph)
    if config.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)


def set_vae_tiling(pipe: Any, enabled: bool) -> None:
    """Tiled or whole-image VAE decode for the next call."""
    vae = pipe.vae
    if enabled:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
