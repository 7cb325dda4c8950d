"""The Qwen-Image 2.1 slugs' own contract (they have no Segmind page): references optional up to
the model's ten, native 2K sizes, 40 steps without CFG (the fast slug: Turbo's fixed 8, with no
steps or guidance to choose), both OpenAI routes. Every bound of every
parameter is also checked by test_contract.py's generic tests, which cover these slugs."""

from __future__ import annotations

import math

import pytest

from qwenserve.api.openai_request import parse_edit, parse_generation
from qwenserve.catalog import (
    MODELS,
    PipelineKind,
    SchedulerKind,
    input_schema,
    model_entry,
    validate_request,
)
from qwenserve.catalog.models_21 import (
    MAX_REFERENCE_IMAGES,
    QWEN_IMAGE_21_BASE,
    QWEN_IMAGE_21_SIZES,
    QWEN_IMAGE_21_TURBO,
)
from qwenserve.errors import InvalidRequest
from tests.catalog.test_contract import IMAGE

SLUGS = ("qwen-image-2.1", "qwen-image-2.1-fast")


@pytest.mark.parametrize("slug", SLUGS)
def test_text_alone_is_a_whole_request_with_the_models_defaults(slug: str) -> None:
    request = validate_request(slug, {"prompt": "a fox"}, seed_source=lambda: 5)
    assert request.images == () and request.guidance == 1.0 and request.seed == 5
    assert request.steps == (40 if slug == "qwen-image-2.1" else 8)
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


def test_fast_runs_the_turbo_checkpoint_and_no_lora() -> None:
    plain, fast = MODELS["qwen-image-2.1"].recipe, MODELS["qwen-image-2.1-fast"].recipe
    assert plain.pipeline is fast.pipeline is PipelineKind.QWEN_IMAGE_21
    assert plain.base_weights == QWEN_IMAGE_21_BASE == "Qwen/Qwen-Image-2.1"
    assert fast.base_weights == QWEN_IMAGE_21_TURBO == "Qwen/Qwen-Image-2.1-Turbo"
    assert plain.lightning is None and fast.lightning is None
    assert fast.scheduler is plain.scheduler is SchedulerKind.STOCK  # the checkpoint's own
    assert fast.fixed_sigma_grid and not plain.fixed_sigma_grid
    assert plain.size_multiple == 32 and plain.max_input_images == MAX_REFERENCE_IMAGES
    entry = model_entry(MODELS["qwen-image-2.1-fast"], 0.01)
    assert entry["weights"] == "Qwen/Qwen-Image-2.1-Turbo" and entry["distillation_lora"] is None
    assert "Qwen/Qwen-Image-2.1-Turbo" in entry["description"]  # what /docs shows per slug


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


def test_fast_always_runs_turbos_8_steps_without_cfg() -> None:
    fast = MODELS["qwen-image-2.1-fast"]
    for name in ("negative_prompt", "steps", "guidance"):
        assert fast.param(name) is None, name
        assert name not in input_schema(fast)["properties"]
    request = validate_request("qwen-image-2.1-fast", {"prompt": "x"})
    assert (request.steps, request.guidance) == (8, 1.0)
    with pytest.raises(InvalidRequest) as caught:
        validate_request("qwen-image-2.1-fast", {"prompt": "x", "steps": 4})
    assert caught.value.field == "steps"
    assert "always runs 8 steps, the fixed sigma grid" in caught.value.message
    with pytest.raises(InvalidRequest) as caught:
        validate_request("qwen-image-2.1-fast", {"prompt": "x", "guidance": 3})
    assert caught.value.field == "guidance" and "without CFG" in caught.value.message


def test_openai_generations_and_edits_both_take_the_21_slugs() -> None:
    made = parse_generation({"model": "qwen-image-2.1", "prompt": "x", "size": "1024x768"})
    assert made.slug == "qwen-image-2.1"
    assert made.body["width"] == 1024 and made.body["height"] == 768
    edited = parse_edit({"model": "qwen-image-2.1-fast", "prompt": "x"}, [IMAGE, IMAGE])
    assert edited.slug == "qwen-image-2.1-fast"
    assert {"image_1", "image_2"} <= set(edited.body)
