"""A faster channel norm for the Qwen-Image VAE when it runs on a CPU.

diffusers' ``QwenImageRMS_norm`` normalises over the channel dimension with
``F.normalize(x, dim=1)``. On a CPU, torch's ``linalg_vector_norm`` kernel reduces over that
strided dimension some 50x slower than a plain sum of squares does (measured: 10.9 ms against
0.2 ms for a 4-channel 256x256 map, 87 ms against 1.7 ms for eight of them), which made the VAE
decode 60-80% of a tiny-preset image and nearly cancelled what batching gains there. The
replacement computes the same function, ``x / max(||x||, eps)`` with the same eps, and differs
by float rounding only (tests/runtime/test_cpu_kernels.py states the bound). GPUs keep the stock
kernel.
"""

from __future__ import annotations

import types
from typing import Any

import torch

_EPS = 1e-12  # F.normalize's default


def _channel_rms_norm(self: Any, x: torch.Tensor) -> torch.Tensor:
    upcast = x.dtype in (torch.float16, torch.bfloat16) or "float8_" in str(x.dtype)
    values = x.float() if upcast else x
    dim = 1 if self.channel_first else -1
    norm = values.square().sum(dim=dim, keepdim=True).sqrt().clamp_min(_EPS)
    normalized = (values / norm).to(x.dtype)
    result: torch.Tensor = normalized * self.scale * self.gamma + self.bias
    return result


def use_fast_vae_norms(vae: torch.nn.Module) -> int:
    """Swap every QwenImageRMS_norm in ``vae`` to the sum-of-squares form; returns how many."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageRMS_norm

    swapped = 0
    for module in vae.modules():
        if isinstance(module, QwenImageRMS_norm):
            module.forward = types.MethodType(_channel_rms_norm, module)  # type: ignore[method-assign]
            swapped += 1
    return swapped
