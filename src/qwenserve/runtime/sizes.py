"""Output sizes in the runtime: a request is generated at the size admission fixed
(``GenerationRequest.size``), planned by ``catalog/sizes.py`` (pure arithmetic, no torch, so the
API fixes sizes without importing the runtime). Nothing here re-derives a size from a request's
width/height/aspect_ratio fields."""

from __future__ import annotations

from collections.abc import Sequence

from qwenserve.catalog import GenerationRequest, Recipe
from qwenserve.catalog.sizes import (
    SIZE_MULTIPLE,
    TINY_AREA,
    TINY_MAX_EXPLICIT_AREA,
    SizePlan,
    parse_ratio,
    plan_for,
    size_for_area,
)

__all__ = [
    "SIZE_MULTIPLE",
    "TINY_AREA",
    "TINY_MAX_EXPLICIT_AREA",
    "SizePlan",
    "parse_ratio",
    "plan_size",
    "size_for_area",
]


def plan_size(
    request: GenerationRequest,
    recipe: Recipe,
    input_sizes: Sequence[tuple[int, int]],
    *,
    tiny: bool,
) -> SizePlan:
    """How the pipeline makes ``request.size`` (fixed at admission): ``catalog.sizes.plan_for``;
    ``input_sizes`` matter only to a size that follows the input image."""
    return plan_for(request.size, recipe, input_sizes, tiny=tiny)
