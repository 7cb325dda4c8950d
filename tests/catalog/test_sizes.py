"""Output sizes: fixed once at validation (admission), planned by the runtime from that fixed
size alone: aspect ratios, explicit sizes, matching the input image, the tiny preset."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import qwenserve
from qwenserve.catalog import get_model, validate_request
from qwenserve.catalog.sizes import (
    TINY_AREA,
    OutputSize,
    SizeKind,
    fix_size,
    parse_ratio,
    plan_for,
    size_for_area,
)
from qwenserve.errors import InvalidRequest

IMAGE = "https://example.com/input.png"


def test_native_sizes_are_the_recipe_sizes_on_real_weights() -> None:
    request = validate_request("qwen-image", {"prompt": "p", "aspect_ratio": "16:9"})
    assert request.size == OutputSize(SizeKind.RATIO, 1664 * 928, 1664, 928)
    plan = plan_for(request.size, get_model("qwen-image").recipe, [], tiny=False)
    assert (plan.width, plan.height) == (1664, 928)
    assert not plan.needs_crop


def test_tiny_preset_keeps_ratio_at_a_small_area() -> None:
    request = validate_request("qwen-image", {"prompt": "p", "aspect_ratio": "9:16"})
    plan = plan_for(request.size, get_model("qwen-image").recipe, [], tiny=True)
    assert plan.width % 16 == 0 and plan.height % 16 == 0
    assert plan.height > plan.width
    assert abs(plan.width * plan.height - TINY_AREA) / TINY_AREA < 0.15


@pytest.mark.parametrize("ratio", ["4:5", "5:4", "21:9", "1:1"])
def test_ratio_without_native_size_keeps_default_area(ratio: str) -> None:
    spec = get_model("qwen-image-edit-plus-product-photography")
    request = validate_request(spec.slug, {"prompt": "p", "image_1": IMAGE, "aspect_ratio": ratio})
    assert request.size.kind is SizeKind.RATIO  # fixed at admission: the input does not matter
    plan = plan_for(request.size, spec.recipe, [(640, 480)], tiny=False)
    assert plan.width % 16 == 0 and plan.height % 16 == 0
    area = spec.recipe.default_area
    assert abs(plan.width * plan.height - area) / area < 0.05
    assert abs(plan.width / plan.height - parse_ratio(ratio)) < 0.03


def test_match_input_is_recorded_as_following_the_input_and_uses_the_last_image() -> None:
    spec = get_model("qwen-image-edit-plus-product-photography")
    request = validate_request(spec.slug, {"prompt": "p", "image_1": IMAGE, "image_2": IMAGE})
    # What admission can honestly fix: it follows the input, at the recipe's default area.
    assert request.size == OutputSize(SizeKind.INPUT, spec.recipe.default_area)
    assert request.size.width is None and request.size.megapixels == pytest.approx(1.048576)
    plan = plan_for(request.size, spec.recipe, [(1000, 500), (300, 600)], tiny=False)
    assert plan.height > plan.width  # 1:2 like the second image, not 2:1 like the first
    assert abs(plan.width / plan.height - 0.5) < 0.03


def test_an_edit_of_2_1_without_an_image_is_fixed_at_its_1_1_size() -> None:
    request = validate_request(
        "qwen-image-2.1", {"prompt": "p", "aspect_ratio": "match_input_image"}
    )
    assert request.size == OutputSize(SizeKind.RATIO, 2048 * 2048, 2048, 2048)


def test_explicit_size_is_exact_and_generated_at_the_next_multiple_of_16() -> None:
    request = validate_request("qwen-image-2512", {"prompt": "p", "width": 300, "height": 260})
    assert request.size == OutputSize(SizeKind.EXPLICIT, 300 * 260, 300, 260)
    plan = plan_for(request.size, get_model("qwen-image-2512").recipe, [], tiny=True)
    assert (plan.width, plan.height) == (300, 260)
    assert (plan.generate_width, plan.generate_height) == (304, 272)
    assert plan.needs_crop


def test_the_plan_follows_the_fixed_size_not_the_request_fields() -> None:
    """The runtime never re-plans from width/height/aspect_ratio: a request whose fields changed
    after admission keeps the size admission fixed."""
    request = validate_request("qwen-image", {"prompt": "p", "aspect_ratio": "16:9"})
    changed = dataclasses.replace(request, aspect_ratio="9:16")
    plan = plan_for(changed.size, get_model("qwen-image").recipe, [], tiny=False)
    assert (plan.width, plan.height) == (1664, 928)


def test_a_slug_the_catalog_no_longer_knows_takes_the_default_area() -> None:
    size = fix_size(None, width=None, height=None, aspect_ratio="16:9", has_images=False)
    assert size.kind is SizeKind.RATIO and size.width is not None and size.height is not None
    assert abs(size.area - 1024 * 1024) / (1024 * 1024) < 0.05
    assert size.width > size.height


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": SizeKind.INPUT, "area": 100, "width": 10, "height": 10},
        {"kind": SizeKind.RATIO, "area": 100},
        {"kind": SizeKind.EXPLICIT, "area": 100, "width": 0, "height": 10},
        {"kind": SizeKind.RATIO, "area": 99, "width": 10, "height": 10},
    ],
)
def test_an_inconsistent_size_cannot_be_built(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        OutputSize(**fields)


def test_size_for_area_rounds_to_16() -> None:
    width, height = size_for_area(16 / 9, 1024 * 1024)
    assert width % 16 == 0 and height % 16 == 0
    assert width > height


@pytest.mark.parametrize("bad", ["16x9", "0:1", "a:b", "1:0"])
def test_bad_ratio_names_the_field(bad: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_ratio(bad)
    assert caught.value.field == "aspect_ratio"


def test_sizing_does_not_import_torch() -> None:
    """The API fixes sizes at admission, and the API process never imports torch."""
    code = (
        "import sys\n"
        "import qwenserve.catalog.sizes, qwenserve.catalog\n"
        "print(','.join(m for m in ('torch', 'diffusers') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""


def _uses(root: Path) -> dict[str, set[str]]:
    """Per module under ``root``: which of ``fix_size(...)`` and ``<x>.aspect_ratio`` it uses."""
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = None
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "fix_size":
                name = "fix_size"
            elif isinstance(node, ast.Attribute) and node.attr == "aspect_ratio":
                name = "aspect_ratio"
            if name is not None:
                found.setdefault(path.relative_to(root).as_posix(), set()).add(name)
    return found


def test_a_size_is_fixed_in_one_place() -> None:
    """Validation (admission) fixes a request's size; the stores fix the size of a record older
    than that, once, as it loads. Nothing else derives a size from a request's ratio."""
    root = Path(qwenserve.__file__).parent
    uses = _uses(root)
    assert uses == {"catalog/validate.py": {"fix_size"}, "store/records.py": {"fix_size"}}


def test_the_size_scan_sees_a_second_place(tmp_path: Path) -> None:
    (tmp_path / "runtime.py").write_text("def f(r):\n    return fix_size(r), r.aspect_ratio\n")
    assert _uses(tmp_path) == {"runtime.py": {"fix_size", "aspect_ratio"}}
