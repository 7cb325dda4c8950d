"""Output sizes: fixed once at admission (``fix_size``), turned into a generation plan by the
runtime (``plan_for``). Pure arithmetic, no torch, so the API process can use it.

What admission can fix depends on the request: an explicit width/height is the output size;
an aspect ratio (or none, text-to-image) is the recipe's native size for it, or the ratio at the
recipe's default area. An edit that follows its input image (``match_input_image``, or no ratio
with an input image) cannot be fixed before the worker decodes that image (a URL input is only
fetched there): admission records that it follows the input and at which pixel area, and the
runtime takes the ratio from the last input image. That is the one size not known at admission.

The pipelines floor sizes to multiples of 16 (Qwen-Image 2.1: 32, ``Recipe.size_multiple``)
with only a log warning, so every size chosen here is already such a multiple; an explicit
width/height that is not is generated at the next multiple up and center-cropped to exactly what
was asked. The tiny preset (random weights, noise images, tests on a CPU) generates at about
``TINY_AREA`` pixels instead: it shrinks a fixed or input-following size to that area at the same
ratio, and honours an explicit width/height by generating smaller and resizing.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qwenserve.catalog.spec import Recipe
from qwenserve.errors import InvalidRequest

SIZE_MULTIPLE = 16
DEFAULT_AREA = 1024 * 1024
"""The default pixel area of a recipe (``Recipe.default_area``), used for a record whose slug
the catalog no longer knows."""
TINY_AREA = 256 * 256
"""Pixel area the tiny preset generates at: a real pipeline on a CPU in well under a second."""
TINY_MAX_EXPLICIT_AREA = 384 * 384
"""The tiny preset generates an explicit width/height larger than this at this area (same
aspect) and resizes to the exact size: its images are noise, and 2048² on a CPU takes minutes."""

MATCH_INPUT = "match_input_image"


class SizeKind(enum.StrEnum):
    """Where a job's output size came from, as admission fixed it."""

    EXPLICIT = "explicit"
    """The caller's width/height: delivered exactly (cropped, or resized by the tiny preset)."""
    RATIO = "ratio"
    """From the aspect ratio (a native size, or the ratio at the default area), or the default
    1:1 of a request that names none."""
    INPUT = "input"
    """Follows the last input image's ratio at ``area`` pixels: fixed when the worker decodes
    that image, not at admission."""


@dataclass(frozen=True)
class OutputSize:
    """A job's output size as admission fixed it (``fix_size``): ``width`` x ``height`` pixels,
    or, for ``SizeKind.INPUT``, no width/height yet and the pixel ``area`` the input's ratio
    is taken at."""

    kind: SizeKind
    area: int
    width: int | None = None
    height: int | None = None

    def __post_init__(self) -> None:
        fixed = self.width is not None and self.height is not None
        if self.kind is SizeKind.INPUT and (self.width is not None or self.height is not None):
            raise ValueError("an input-following size has no width/height before its input")
        if self.kind is not SizeKind.INPUT and not fixed:
            raise ValueError(f"a {self.kind.value} size needs its width and height")
        width, height = self.width or 0, self.height or 0
        if self.area < 1 or (fixed and (min(width, height) < 1 or self.area != width * height)):
            raise ValueError(f"invalid size {self}")

    @property
    def megapixels(self) -> float:
        """The output's millions of pixels (for an input-following size, its target area)."""
        return self.area / 1e6


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


def fix_size(
    recipe: Recipe | None,
    *,
    width: int | None,
    height: int | None,
    aspect_ratio: str | None,
    has_images: bool,
) -> OutputSize:
    """The output size a request gets, fixed at admission; ``recipe`` None (a slug the catalog
    no longer knows, an old record) takes the defaults. In order: explicit width/height (one
    side alone makes a square), a native size for the aspect ratio, the ratio at the default
    area, the input image's ratio (``match_input_image`` or no ratio, with an input image),
    the 1:1 size.

    Raises InvalidRequest (naming ``aspect_ratio``) for a ratio that is not W:H.
    """
    area = recipe.default_area if recipe is not None else DEFAULT_AREA
    multiple = recipe.size_multiple if recipe is not None else SIZE_MULTIPLE
    sizes: Mapping[str, tuple[int, int]] = recipe.native_sizes if recipe is not None else {}
    if width is not None or height is not None:
        exact_width = width or height or 0
        exact_height = height or width or 0
        return OutputSize(SizeKind.EXPLICIT, exact_width * exact_height, exact_width, exact_height)
    if aspect_ratio and aspect_ratio != MATCH_INPUT:
        if aspect_ratio in sizes:
            fixed = sizes[aspect_ratio]
        else:
            fixed = size_for_area(parse_ratio(aspect_ratio), area, multiple)
    elif has_images:
        return OutputSize(SizeKind.INPUT, area)
    elif "1:1" in sizes:
        fixed = sizes["1:1"]
    else:
        fixed = size_for_area(1.0, area, multiple)
    return OutputSize(SizeKind.RATIO, fixed[0] * fixed[1], fixed[0], fixed[1])


def plan_for(
    size: OutputSize,
    recipe: Recipe,
    input_sizes: Sequence[tuple[int, int]],
    *,
    tiny: bool,
) -> SizePlan:
    """How the pipeline makes ``size``, the size admission fixed: an explicit one at the next
    multiple up (then cropped), a ratio one as it is, an input-following one at the last input
    image's ratio (1:1 without one). The tiny preset generates at about ``TINY_AREA`` (see the
    module docstring)."""
    multiple = recipe.size_multiple
    if size.kind is SizeKind.EXPLICIT:
        width, height = size.width or 0, size.height or 0
        if tiny and width * height > TINY_MAX_EXPLICIT_AREA:
            small_width, small_height = size_for_area(
                width / height, TINY_MAX_EXPLICIT_AREA, multiple
            )
            return SizePlan(small_width, small_height, width, height)
        return SizePlan(
            _ceil_to_multiple(width, multiple), _ceil_to_multiple(height, multiple), width, height
        )
    if size.kind is SizeKind.RATIO:
        width, height = size.width or 0, size.height or 0
        if tiny:
            width, height = size_for_area(width / height, TINY_AREA, multiple)
        return SizePlan(width, height, width, height)
    area = TINY_AREA if tiny else size.area
    ratio = 1.0
    if input_sizes:
        last_width, last_height = input_sizes[-1]
        ratio = last_width / max(last_height, 1)
    width, height = size_for_area(ratio, area, multiple)
    return SizePlan(width, height, width, height)
