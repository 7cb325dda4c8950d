"""Output sizes: from a request's aspect ratio, explicit width/height or its input images.

Pure arithmetic, no torch. The pipelines floor sizes to multiples of 16 (Qwen-Image 2.1: 32,
``Recipe.size_multiple``) with only a log warning, so every size chosen here is already such a
multiple; an explicit width/height that is not is generated at the next multiple up and
center-cropped to exactly what was asked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qwenserve.catalog import GenerationRequest, Recipe
from qwenserve.errors import InvalidRequest

SIZE_MULTIPLE = 16
TINY_AREA = 256 * 256
"""Pixel area the tiny preset generates at: a real pipeline on a CPU in well under a second."""
TINY_MAX_EXPLICIT_AREA = 384 * 384
"""The tiny preset generates an explicit width/height larger than this at this area (same
aspect) and resizes to the exact size: its images are noise, and 2048² on a CPU takes minutes."""

MATCH_INPUT = "match_input_image"


@dataclass(frozen=True)
class SizePlan:
    """The size the pipeline generates at, and the exact size the caller gets after cropping."""

    generate_width: int
    generate_height: int
    width: int
    height: int

    @property
    def needs_crop(self) -> bool:
        return (self.generate_width, self.generate_height) != (self.width, self.height)

    @property
    def needs_resize(self) -> bool:
        """True when the generated image is smaller than asked (tiny preset only)."""
        return self.generate_width < self.width or self.generate_height < self.height


def _round_to_multiple(value: float, multiple: int = SIZE_MULTIPLE) -> int:
    return max(multiple, round(value / multiple) * multiple)


def _ceil_to_multiple(value: int, multiple: int = SIZE_MULTIPLE) -> int:
    return max(multiple, math.ceil(value / multiple) * multiple)


def size_for_area(ratio: float, area: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """About ``area`` pixels at ``ratio`` (width / height), both sides multiples of
    ``multiple`` (16; 32 for Qwen-Image 2.1)."""
    width = math.sqrt(area * ratio)
    return _round_to_multiple(width, multiple), _round_to_multiple(width / ratio, multiple)


def parse_ratio(aspect_ratio: str) -> float:
    """``"16:9"`` → 16/9. Raises InvalidRequest for anything else."""
    left, sep, right = aspect_ratio.partition(":")
    try:
        ratio = float(left) / float(right)
    except (ValueError, ZeroDivisionError):
        ratio = float("nan")
    if not sep or not math.isfinite(ratio) or ratio <= 0:
        raise InvalidRequest(f"aspect_ratio {aspect_ratio!r} is not W:H", field="aspect_ratio")
    return ratio


def native_sizes(recipe: Recipe, *, tiny: bool) -> Mapping[str, tuple[int, int]]:
    """The recipe's native sizes; the tiny preset keeps each ratio at about ``TINY_AREA``."""
    if not tiny:
        return recipe.native_sizes
    multiple = recipe.size_multiple
    return {
        ratio: size_for_area(w / h, TINY_AREA, multiple)
        for ratio, (w, h) in recipe.native_sizes.items()
    }


def plan_size(
    request: GenerationRequest,
    recipe: Recipe,
    input_sizes: Sequence[tuple[int, int]],
    *,
    tiny: bool,
) -> SizePlan:
    """Where the output size comes from, in order: explicit width/height (honoured exactly;
    the tiny preset generates large ones smaller and resizes),
    a native size for the aspect ratio, the ratio at the default area, the last input image's
    ratio at the default area (edit slugs, ``match_input_image`` or no ratio), the 1:1 size.
    """
    area = TINY_AREA if tiny else recipe.default_area
    multiple = recipe.size_multiple
    if request.width is not None or request.height is not None:
        width = request.width or request.height or 0
        height = request.height or request.width or 0
        if tiny and width * height > TINY_MAX_EXPLICIT_AREA:
            small_width, small_height = size_for_area(
                width / height, TINY_MAX_EXPLICIT_AREA, multiple
            )
            return SizePlan(small_width, small_height, width, height)
        return SizePlan(
            _ceil_to_multiple(width, multiple), _ceil_to_multiple(height, multiple), width, height
        )

    sizes = native_sizes(recipe, tiny=tiny)
    ratio_name = request.aspect_ratio
    if ratio_name and ratio_name != MATCH_INPUT:
        if ratio_name in sizes:
            width, height = sizes[ratio_name]
        else:
            width, height = size_for_area(parse_ratio(ratio_name), area, multiple)
    elif input_sizes:
        last_width, last_height = input_sizes[-1]
        width, height = size_for_area(last_width / max(last_height, 1), area, multiple)
    elif "1:1" in sizes:
        width, height = sizes["1:1"]
    else:
        width, height = size_for_area(1.0, area, multiple)
    return SizePlan(width, height, width, height)
