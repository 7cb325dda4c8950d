"""Scheduler configurations: the base model's own, and the Lightning one, per call.

Both are ``FlowMatchEulerDiscreteScheduler``. The stock Qwen-Image configuration stretches the
schedule to a terminal shift of 0.02, which for a single step divides 0 by 0 (the timesteps become
NaN and the image garbage, with only a warning); the contract allows ``steps = 1``, so a one-step
call drops the terminal shift. The Lightning LoRAs were distilled for a fixed shift of 3 (dynamic
shifting with ``base_shift = max_shift = ln 3``), with which one step is well defined.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from diffusers import FlowMatchEulerDiscreteScheduler

from qwenserve.catalog import SchedulerKind

STOCK_SCHEDULER_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 0.9,
        "base_image_seq_len": 256,
        "max_image_seq_len": 8192,
        "shift_terminal": 0.02,
        "time_shift_type": "exponential",
        "invert_sigmas": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "stochastic_sampling": False,
    }
)
"""Qwen/Qwen-Image's own scheduler (the tiny preset saves this one as its scheduler)."""

LIGHTNING_SCHEDULER_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        **STOCK_SCHEDULER_CONFIG,
        "base_shift": math.log(3),
        "max_shift": math.log(3),
        "shift_terminal": None,
    }
)
"""The fixed shift-3 schedule the Lightning LoRAs were distilled with."""


def scheduler_for(
    kind: SchedulerKind, steps: int, stock_config: Mapping[str, Any]
) -> FlowMatchEulerDiscreteScheduler:
    """A fresh scheduler for one call.

    ``stock_config`` is the base checkpoint's own scheduler configuration (as loaded from its
    folder); it is used for ``SchedulerKind.STOCK`` and loses its terminal shift for one step.
    """
    if kind is SchedulerKind.LIGHTNING:
        config = dict(LIGHTNING_SCHEDULER_CONFIG)
    else:
        config = {k: v for k, v in stock_config.items() if not k.startswith("_")}
        if steps <= 1 and config.get("shift_terminal"):
            config["shift_terminal"] = None
    scheduler: FlowMatchEulerDiscreteScheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    return scheduler
