"""The Qwen-Image 2.1 slugs' own contract (they have no Segmind page): references optional up to
the model's ten, native 2K sizes, 40 steps without CFG, both OpenAI routes. Every bound of every
parameter is also checked by test_contract.py's generic tests, which cover these slugs."""

from __future__ import annotations

import math

import pytest

from qwenserve.api.openai_request import parse_edit, parse_generation
from qwenserve.catalog import MODELS, PipelineKind, input_schema, model_entry, validate_request
from qwenserve.catalog.models_21 import MAX_REFERENCE_IMAGES, QWEN_IMAGE_21_SIZES
from qwenserve.errors import InvalidRequest
from tests.catalog.test_contract import IMAGE

SLUGS = ("qwen-image-2.1", "qwen-image-2.1-fast")


@pytest.mark.parametrize("slug", SLUGS)
def test_text_alone_is_a_whole_request_with_the_models_defaults(slug: str) -> None:
    request = validate_request(slug, {"prompt": "a fox"}, seed_source=lambda: 5)
    assert request.images == () and request.guidance == 1.0 and request.seed == 5
    assert request.steps == (40 if slug == "qwen-image-2.1" else 4)
    assert request.aspect_ratio == "match_input_image" and request.image_format == "png"
    assert "anyOf" not in input_schema(MODELS[slug])  # no image required
    assert model_entry(MODELS[slug], 0.1)["kind"] == "text-to-image+edit"


@pytest.mark.parametrize("slug", SLUGS)
def test_up_to_ten_references_in_order_and_an_eleventh_is_refused(slug: str) -> None:
    body = {"prompt": "x", **{f"image_{i}": IMAGE for i in range(MAX_REFERENCE_IMAGES, 0, -1)}}
    request = validate_request(slug, body)
    assert [i.field for i in request.images] == [f"image_{i}" for i in range(1, 11)]
    with pytest.raises(InvalidRequest) as caught:
        validate_request(slug, {**body, "image_11": IMAGE})
    assert caught.value.field == "image_11"


def test_recipe_is_qwen_image_21_with_its_lightning_on_the_shared_base() -> None:
    plain, fast = MODELS["qwen-image-2.1"].recipe, MODELS["qwen-image-2.1-fast"].recipe
    assert plain.pipeline is fast.pipeline is PipelineKind.QWEN_IMAGE_21
    assert plain.base_weights == fast.base_weights == "Qwen/Qwen-Image-2.1"
    assert plain.lightning is None and fast.lightning is not None
    assert fast.lightning.repo == "lightx2v/Qwen-Image-2.1-Lightning"
    assert plain.size_multiple == 32 and plain.max_input_images == MAX_REFERENCE_IMAGES


def test_native_sizes_are_2k_and_multiples_of_32() -> None:
    assert QWEN_IMAGE_21_SIZES["1:1"] == (2048, 2048)
    for ratio, (width, height) in QWEN_IMAGE_21_SIZES.items():
        left, right = (int(v) for v in ratio.split(":"))
        assert width % 32 == 0 and height % 32 == 0
        assert abs(math.log(width / height) - math.log(left / right)) < 0.02
        assert 0.95 < width * height / 2048**2 < 1.05
    ratio = MODELS["qwen-image-2.1"].param("aspect_ratio")
    assert ratio is not None and ratio.allowed == (*QWEN_IMAGE_21_SIZES, "match_input_image")


def test_width_and_height_bound_the_area_to_2048_squared() -> None:
    for name in ("width", "height"):
        param = MODELS["qwen-image-2.1"].param(name)
        assert param is not None and (param.minimum, param.maximum) == (256, 2048)
    with pytest.raises(InvalidRequest) as caught:
        validate_request("qwen-image-2.1", {"prompt": "x", "width": 2049, "height": 2049})
    assert {e.field for e in caught.value.errors} == {"width", "height"}


def test_fast_has_no_negative_prompt_and_caps_steps_at_8() -> None:
    fast = MODELS["qwen-image-2.1-fast"]
    assert fast.param("negative_prompt") is None
    steps = fast.param("steps")
    assert steps is not None and (steps.default, steps.maximum) == (4, 8)


def test_openai_generations_and_edits_both_take_the_21_slugs() -> None:
    made = parse_generation({"model": "qwen-image-2.1", "prompt": "x", "size": "1024x768"})
    assert made.slug == "qwen-image-2.1"
    assert made.body["width"] == 1024 and made.body["height"] == 768
    edited = parse_edit({"model": "qwen-image-2.1-fast", "prompt": "x"}, [IMAGE, IMAGE])
    assert edited.slug == "qwen-image-2.1-fast"
    assert {"image_1", "image_2"} <= set(edited.body)
