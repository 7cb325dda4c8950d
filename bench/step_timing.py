"""What a denoising step costs: the transformer's FLOPs by formula, and its measured seconds.

Shared by the GPU benchmarks (``gpu_step_time.py``, ``gpu_verify.py``) so that both divide by
the same FLOP count and time steps the same way.

FLOPs of one Qwen-Image transformer forward over L = image + text tokens (image tokens are
(H/16)·(W/16): 8x VAE, 2x2 patches): every token passes the q, k, v, out projections and the
4x MLP of its stream in each block, 2·layers·12·width² per token (13.6 GFLOP at width 3072, 60
layers), and joint attention costs 4·layers·width·L² (QKᵀ and PV; 737,280·L²). The per-sample
AdaLN modulation and the embedders are left out (under 0.1% at 1 MP).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PATCH_PIXELS = 16
"""Pixels per image token along each side: the VAE's 8x times the transformer's 2x2 patches."""


def image_tokens(width: int, height: int) -> int:
    """Image tokens the transformer sees for a width x height output."""
    return (width // PATCH_PIXELS) * (height // PATCH_PIXELS)


@dataclass(frozen=True)
class TransformerShape:
    """The sizes that set a forward's FLOPs; the defaults are the published Qwen-Image ones."""

    layers: int = 60
    width: int = 3072
    """Attention width: heads x head dim (24 x 128)."""
    mlp_ratio: int = 4

    @classmethod
    def of(cls, transformer: Any) -> TransformerShape:
        """The shape of a loaded ``QwenImageTransformer2DModel`` (the tiny preset's too)."""
        config = transformer.config
        return cls(
            layers=int(config.num_layers),
            width=int(config.num_attention_heads) * int(config.attention_head_dim),
        )

    def forward_flop(self, image_tokens: int, text_tokens: int) -> float:
        """FLOPs of one transformer forward for one sample."""
        tokens = image_tokens + text_tokens
        per_token = 2 * self.layers * (4 + 2 * self.mlp_ratio) * self.width**2
        attention = 4 * self.layers * self.width * tokens**2
        return float(per_token * tokens + attention)


QWEN_IMAGE = TransformerShape()


class StepClock:
    """An ``on_step`` callback that stamps the end of every denoising step.

    ``sync`` (``torch.cuda.synchronize`` on a GPU) runs before each stamp so that a stamp is
    when the step's kernels finished, not when they were queued."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self.stamps: list[float] = []

    def start(self) -> float:
        self._sync()
        self.stamps = [time.perf_counter()]
        return self.stamps[0]

    def __call__(self, done: int, total: int) -> None:
        self._sync()
        self.stamps.append(time.perf_counter())

    def step_s(self) -> list[float]:
        """Seconds of each step; the first also holds the call's set-up (text, latents)."""
        return [b - a for a, b in itertools.pairwise(self.stamps)]

    def median_step_s(self) -> float:
        """The median step: robust to the first step's set-up and the last one's decode."""
        return statistics.median(self.step_s())
