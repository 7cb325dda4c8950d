"""Output size planning: aspect ratios, explicit sizes, matching the input image."""

from __future__ import annotations

import pytest

from qwenserve.catalog import get_model
from qwenserve.errors import InvalidRequest
from qwenserve.runtime.sizes import TINY_AREA, parse_ratio, plan_size, size_for_area
from tests.runtime.conftest import make_request, noise_image, png_base64

IMAGE = png_base64(noise_image(8, 8))


def test_native_sizes_are_the_recipe_sizes_on_real_weights() -> None:
    request = make_request("qwen-image", prompt="p", steps=4, aspect_ratio="16:9")
    plan = plan_size(request, get_model("qwen-image").recipe, [], tiny=False)
    assert (plan.width, plan.height) == (1664, 928)
    assert not plan.needs_crop


def test_tiny_preset_keeps_ratio_at_a_small_area() -> None:
    request = make_request("qwen-image", prompt="p", steps=4, aspect_ratio="9:16")
    plan = plan_size(request, get_model("qwen-image").recipe, [], tiny=True)
    assert plan.width % 16 == 0 and plan.height % 16 == 0
    assert plan.height > plan.width
    assert abs(plan.width * plan.height - TINY_AREA) / TINY_AREA < 0.15


@pytest.mark.parametrize("ratio", ["4:5", "5:4", "21:9", "1:1"])
def test_ratio_without_native_size_keeps_default_area(ratio: str) -> None:
    spec = get_model("qwen-image-edit-plus-product-photography")
    request = make_request(spec.slug, prompt="p", image_1=IMAGE, aspect_ratio=ratio)
    plan = plan_size(request, spec.recipe, [(640, 480)], tiny=False)
    assert plan.width % 16 == 0 and plan.height % 16 == 0
    area = spec.recipe.default_area
    assert abs(plan.width * plan.height - area) / area < 0.05
    assert abs(plan.width / plan.height - parse_ratio(ratio)) < 0.03


def test_match_input_uses_the_last_image() -> None:
    spec = get_model("qwen-image-edit-plus-product-photography")
    request = make_request(spec.slug, prompt="p", image_1=IMAGE, image_2=IMAGE)
    plan = plan_size(request, spec.recipe, [(1000, 500), (300, 600)], tiny=False)
    assert plan.height > plan.width  # 1:2 like the second image, not 2:1 like the first
    assert abs(plan.width / plan.height - 0.5) < 0.03


def test_explicit_size_is_exact_and_generated_at_the_next_multiple_of_16() -> None:
    request = make_request("qwen-image-2512", prompt="p", width=300, height=260)
    plan = plan_size(request, get_model("qwen-image-2512").recipe, [], tiny=True)
    assert (plan.width, plan.height) == (300, 260)
    assert (plan.generate_width, plan.generate_height) == (304, 272)
    assert plan.needs_crop


def test_size_for_area_rounds_to_16() -> None:
    width, height = size_for_area(16 / 9, 1024 * 1024)
    assert width % 16 == 0 and height % 16 == 0
    assert width > height


@pytest.mark.parametrize("bad", ["16x9", "0:1", "a:b", "1:0"])
def test_bad_ratio_names_the_field(bad: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_ratio(bad)
    assert caught.value.field == "aspect_ratio"
