"""The GPU fast paths of ``EngineConfig``, applied to a freshly loaded pipeline.

Each is a switch with a safe default. Order matters and is fixed here: weights are final (a
fused Lightning LoRA already in them) before fp8 quantisation, the step cache hooks the blocks
before compilation traces them, and placement (``.to(device)`` or CPU offload) comes last.
Switches that cannot work where the engine runs refuse at load with an ``InferenceError``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from qwenserve.errors import InferenceError
from qwenserve.runtime.config import EngineConfig

VAE_TILING_AUTO_PIXELS = 2 * 1024 * 1024
"""``vae_tiling=None`` tiles the decode of outputs larger than this (about 2 MP)."""


def check_switches(config: EngineConfig, device: torch.device) -> None:
    """Refuse, before anything loads, switches that cannot work on ``device``."""
    if config.cpu_offload and device.type != "cuda":
        raise InferenceError(
            f"cpu_offload needs a CUDA GPU (this engine runs on {device.type}); turn it off"
        )
    if config.quantize not in ("none", "fp8"):
        raise InferenceError(f"unknown quantize {config.quantize!r}; expected none or fp8")
    if config.quantize == "fp8" and importlib.util.find_spec("torchao") is None:
        raise InferenceError(
            "quantize=fp8 needs torchao, which is not installed: pip install 'qwenserve[gpu]'"
        )
    if config.step_cache is not None and not config.step_cache > 0.0:
        raise InferenceError(f"step_cache must be a positive threshold, not {config.step_cache}")
    if config.prompt_cache_size < 0:
        raise InferenceError("prompt_cache_size must be 0 (off) or more")


def quantize_fp8(transformer: torch.nn.Module) -> None:
    """float8 weight-only quantisation of every linear layer, in place (torchao)."""
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    quantize_(transformer, Float8WeightOnlyConfig())


def enable_step_cache(transformer: Any, threshold: float) -> None:
    """diffusers' first-block cache: skip the remaining blocks when block 0 barely changed."""
    from diffusers import FirstBlockCacheConfig

    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))


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


def apply_fast_paths(pipe: Any, config: EngineConfig, device: torch.device) -> None:
    """Quantise, cache, compile and place ``pipe`` as ``config`` asks."""
    if config.quantize == "fp8":
        quantize_fp8(pipe.transformer)
    if config.step_cache is not None:
        enable_step_cache(pipe.transformer, config.step_cache)
    if config.compile:
        # In place (nn.Module.compile): the pipeline keeps its own transformer object, so the
        # LoRA and cache machinery that looks at its class keeps working.
        pipe.transformer.compile()
    if config.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)


def wants_vae_tiling(config: EngineConfig, width: int, height: int) -> bool:
    """Whether a decode of width x height pixels should be tiled."""
    if config.vae_tiling is not None:
        return config.vae_tiling
    return width * height > VAE_TILING_AUTO_PIXELS


def set_vae_tiling(pipe: Any, enabled: bool) -> None:
    """Tiled or whole-image VAE decode for the next call."""
    vae = pipe.vae
    if enabled:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
