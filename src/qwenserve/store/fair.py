"""Weighted fair queuing between keys, decided the same way by every store.

A claim takes the next job of the key with the least service received relative to its weight
(start-time fair queuing): each key has a *tag*, its virtual finish time. Claiming a job of
cost ``c`` from a key of weight ``w`` moves the key's tag to ``max(tag, V) + c / w`` and the
cluster's virtual time ``V`` to that job's start ``max(tag, V)``; a key that starts waiting
joins at ``max(tag, V)``, so being idle earns no credit. Within a key, jobs go FIFO.

Service is estimated in GPU work units, not read from the price: prices are flat per slug,
while a 50-step 1328² job costs ~8x the GPU time of an 8-step 1024² one. The unit is one
denoising step of one megapixel (``steps × width × height / 1e6``), the shape of every
Qwen-Image transformer's cost, read from the typed request: its steps and the output size
admission fixed (``GenerationRequest.size``: an aspect ratio's real size; an edit that follows its
input image, the area it is made at).

Queue positions and ETAs follow the same order: each waiting job is stamped with its projected
start (``store/sqlite/fair_order.py`` says how, and when the estimate drifts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qwenserve.catalog import GenerationRequest


def service_units(request: GenerationRequest) -> float:
    """The estimated GPU work of a job's request: steps × megapixels (always > 0)."""
    return max(request.steps * request.size.megapixels, 1e-3)


def next_tag(tag: float, virtual: float, service: float, weight: float) -> tuple[float, float]:
    """(the key's new tag, the cluster's new virtual time) after it is served ``service``."""
    start = max(tag, virtual)
    return start + service / max(weight, 1e-6), start
