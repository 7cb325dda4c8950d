"""Weighted fair queuing between keys, decided the same way by every store.

A claim takes the next job of the key with the least service received relative to its weight
(start-time fair queuing): each key has a *tag*, its virtual finish time. Claiming a job of
cost ``c`` from a key of weight ``w`` moves the key's tag to ``max(tag, V) + c / w`` and the
cluster's virtual time ``V`` to that job's start ``max(tag, V)``; a key that starts waiting
joins at ``max(tag, V)``, so being idle earns no credit. Within a key, jobs go FIFO.

Service is estimated in GPU work units, not read from the price: prices are flat per slug,
while a 50-step 1328² job costs ~8x the GPU time of an 8-step 1024² one. The unit is one
denoising step of one megapixel (``steps × width × height / 1e6``), the shape of every
Qwen-Image transformer's cost; the slug's default steps and a 1 MP image fill what a
request leaves out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DEFAULT_STEPS = 30
"""Steps assumed for a request that does not say (most slugs' default is near it)."""
DEFAULT_MEGAPIXELS = 1.0
"""Image size assumed for a request without width/height (the catalog's ~1024² default)."""


def service_units(params: Mapping[str, Any]) -> float:
    """The estimated GPU work of a job's request: steps × megapixels (always > 0)."""
    steps = _positive(params.get("steps") or params.get("num_inference_steps"), DEFAULT_STEPS)
    width = _positive(params.get("width"), 0.0)
    height = _positive(params.get("height"), 0.0)
    megapixels = width * height / 1e6 if width and height else DEFAULT_MEGAPIXELS
    return max(steps * megapixels, 1e-3)


def next_tag(tag: float, virtual: float, service: float, weight: float) -> tuple[float, float]:
    """(the key's new tag, the cluster's new virtual time) after it is served ``service``."""
    start = max(tag, virtual)
    return start + service / max(weight, 1e-6), start


def _positive(value: Any, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if number > 0 else default
