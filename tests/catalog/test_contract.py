"""The catalog against the seed pages, and validation at and past every bound of every slug."""

from __future__ import annotations

import base64
import dataclasses
import io
from typing import Any

import pytest
from PIL import Image

from qwenserve.catalog import ALL_MODELS, MODELS, NO_DEFAULT, Param, validate_request
from qwenserve.catalog.models import SEED_CEILING
from qwenserve.errors import InvalidRequest, UnknownModel
from tests.catalog.seed_pages import COPIED_SEEDS_DIR, SOURCE_SEEDS_DIR, read_seed


def _tiny_png_b64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


IMAGE = _tiny_png_b64()
SLUGS = [m.slug for m in ALL_MODELS]
NO_SEED_PAGE = frozenset({"qwen-image-2.1", "qwen-image-2.1-fast"})
"""Slugs declared without a Segmind page (catalog/models_21.py states where their contract
comes from); every other slug is checked against its page."""
SEEDED = [slug for slug in SLUGS if slug not in NO_SEED_PAGE]
PARAMS = [(m.slug, p) for m in ALL_MODELS for p in m.params]


def minimal_body(slug: str) -> dict[str, Any]:
    """The fewest fields a client must send to this slug."""
    body: dict[str, Any] = {}
    for param in MODELS[slug].params:
        if param.must_send:
            body[param.name] = IMAGE if param.type == "uri" else "a red fox"
    if slug == "qwen-image-edit-plus-product-photography":
        body["image_1"] = IMAGE
    return body


def test_catalog_has_exactly_the_seed_slugs_and_the_declared_others() -> None:
    assert set(MODELS) >= NO_SEED_PAGE
    for slug in NO_SEED_PAGE:
        assert not (COPIED_SEEDS_DIR / f"{slug}.txt").exists(), f"{slug} has a page: check it"
    assert set(SEEDED) == {
        "qwen-image",
        "qwen-image-fast",
        "qwen-image-2512",
        "qwen-image-edit-fast",
        "qwen-image-edit-plus-product-photography",
    }


@pytest.mark.parametrize("slug", SEEDED)
def test_catalog_matches_seed_page(slug: str) -> None:
    seed = read_seed(slug)
    spec = MODELS[slug]
    assert list(spec.param_names) == list(seed), "same parameters, in the page's order"
    for param in spec.params:
        page = seed[param.name]
        assert param.required == page.required, param.name
        expected_type = "uri" if page.type == "string (uri)" else page.type
        assert param.type == expected_type, param.name
        if page.default == "<none>":
            assert param.default is NO_DEFAULT, param.name
        else:
            assert param.default == page.default, param.name
            assert type(param.default) is type(page.default), param.name
        if page.minimum is not None:
            assert (param.minimum, param.maximum) == (page.minimum, page.maximum), param.name
            assert not param.implicit_range
        elif param.minimum is not None:
            assert param.implicit_range, f"{param.name}: a range the page does not state"
        if page.allowed:
            assert param.allowed is not None
            if page.allowed_total is not None:
                # The page lists some values and elides the rest ("+1 more"): the listed ones
                # come first, in order, and the default is among the whole set.
                assert len(param.allowed) == page.allowed_total
                assert list(param.allowed[: len(page.allowed)]) == page.allowed
                assert param.default in param.allowed
            else:
                assert list(param.allowed) == page.allowed, param.name
        else:
            assert param.allowed is None, param.name


def test_edit_plus_has_eleven_ratios_with_match_input_image() -> None:
    ratio = MODELS["qwen-image-edit-plus-product-photography"].param("aspect_ratio")
    assert ratio is not None and ratio.allowed is not None
    assert len(ratio.allowed) == 11 and "match_input_image" in ratio.allowed


def test_base64_spelling_per_slug() -> None:
    assert MODELS["qwen-image-2512"].base64_field == "base_64"
    for slug in SLUGS:
        if slug != "qwen-image-2512":
            assert MODELS[slug].base64_field == "base64"
    request = validate_request("qwen-image-2512", {"prompt": "x", "base_64": True})
    assert request.base64 is True
    with pytest.raises(InvalidRequest) as caught:
        validate_request("qwen-image-2512", {"prompt": "x", "base64": True})
    assert caught.value.field == "base64" and "base_64" in caught.value.message


@pytest.mark.parametrize("slug", SLUGS)
def test_minimal_body_is_accepted_with_page_defaults(slug: str) -> None:
    request = validate_request(slug, minimal_body(slug), seed_source=lambda: 1234)
    spec = MODELS[slug]
    fmt = spec.param("image_format")
    assert fmt is not None and request.image_format == fmt.default
    quality = spec.param("quality")
    assert quality is not None and request.quality == quality.default
    seed = spec.param("seed")
    assert seed is not None
    expected_seed = 1234 if seed.default in (-1, None) else seed.default
    assert request.seed == expected_seed


@pytest.mark.parametrize(
    ("slug", "param"),
    [(s, p) for s, p in PARAMS if p.must_send],
    ids=lambda v: getattr(v, "name", v),
)
def test_missing_required_parameter_is_refused(slug: str, param: Param) -> None:
    body = minimal_body(slug)
    del body[param.name]
    with pytest.raises(InvalidRequest) as caught:
        validate_request(slug, body)
    assert caught.value.field == param.name
    assert "required" in caught.value.message


FILLED = [(s, p) for s, p in PARAMS if p.required and not p.must_send]


def test_page_required_parameters_with_a_default_are_the_three_steps() -> None:
    assert sorted((s, p.name) for s, p in FILLED) == [
        ("qwen-image", "steps"),
        ("qwen-image-edit-fast", "steps"),
        ("qwen-image-fast", "steps"),
    ]
    fast_prompt = MODELS["qwen-image-fast"].param("prompt")
    assert fast_prompt is not None and fast_prompt.must_send, "a sample prompt is never filled"


@pytest.mark.parametrize(("slug", "param"), FILLED, ids=[f"{s}.{p.name}" for s, p in FILLED])
def test_page_required_parameter_with_a_default_fills_when_omitted_or_null(
    slug: str, param: Param
) -> None:
    body = minimal_body(slug)
    assert param.name not in body
    assert getattr(validate_request(slug, body), param.name) == param.default
    assert getattr(validate_request(slug, {**body, param.name: None}), param.name) == param.default


RANGED = [(s, p) for s, p in PARAMS if p.minimum is not None]


@pytest.mark.parametrize("slug,param", RANGED, ids=[f"{s}.{p.name}" for s, p in RANGED])
def test_range_bounds_accepted_at_and_refused_past(slug: str, param: Param) -> None:
    assert param.minimum is not None and param.maximum is not None
    step = 1 if param.type == "integer" else 0.01
    low: Any = int(param.minimum) if param.type == "integer" else param.minimum
    high: Any = int(param.maximum) if param.type == "integer" else param.maximum
    for value in (low, high):
        body = {**minimal_body(slug), param.name: value}
        validate_request(slug, body)
    for value in (low - step, high + step):
        body = {**minimal_body(slug), param.name: value}
        with pytest.raises(InvalidRequest) as caught:
            validate_request(slug, body)
        assert caught.value.field == param.name
        assert "between" in caught.value.message


ALLOWED = [(s, p) for s, p in PARAMS if p.allowed]


@pytest.mark.parametrize("slug,param", ALLOWED, ids=[f"{s}.{p.name}" for s, p in ALLOWED])
def test_allowed_values(slug: str, param: Param) -> None:
    assert param.allowed is not None
    for value in param.allowed:
        request = validate_request(slug, {**minimal_body(slug), param.name: value})
        assert value in dataclasses.asdict(request).values()
    for bad in ("bogus", param.allowed[0].upper() + "X", ""):
        with pytest.raises(InvalidRequest) as caught:
            validate_request(slug, {**minimal_body(slug), param.name: bad})
        assert caught.value.field == param.name


TYPED = [(s, p) for s, p in PARAMS]


@pytest.mark.parametrize("slug,param", TYPED, ids=[f"{s}.{p.name}" for s, p in TYPED])
def test_wrong_types_are_refused_naming_the_field(slug: str, param: Param) -> None:
    wrong: list[Any] = {
        "integer": ["8", True, 1.5, [1], {"a": 1}],
        "number": ["3.5", False, [1.0], float("nan")],
        "boolean": ["true", 1, 0],
        "string": [5, True, ["x"], {"x": 1}],
        "uri": [5, False, ["x"], "", "ftp://example.com/a.png"],
    }[param.type]
    for value in wrong:
        with pytest.raises(InvalidRequest) as caught:
            validate_request(slug, {**minimal_body(slug), param.name: value})
        assert caught.value.field == param.name, value


def test_integral_float_is_an_integer() -> None:
    request = validate_request("qwen-image-fast", {"prompt": "x", "steps": 8.0})
    assert request.steps == 8 and isinstance(request.steps, int)


def test_unknown_fields_and_bodies() -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_request("qwen-image", {"prompt": "x", "steps": 30, "negative_promt": "y"})
    assert caught.value.field == "negative_promt"
    assert "negative_prompt" in caught.value.message
    for body in ([], "x", 3, None):
        with pytest.raises(InvalidRequest):
            validate_request("qwen-image", body)
    with pytest.raises(UnknownModel):
        validate_request("flux-dev", {"prompt": "x"})


def test_empty_prompt_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_request("qwen-image-fast", {"prompt": "   ", "steps": 8})
    assert caught.value.field == "prompt"


def test_seed_resolution() -> None:
    drawn = validate_request("qwen-image", {"prompt": "x", "steps": 30, "seed": -1})
    assert 0 <= drawn.seed <= 2**31 - 1
    fixed = validate_request("qwen-image", {"prompt": "x", "steps": 30, "seed": SEED_CEILING})
    assert fixed.seed == SEED_CEILING
    with pytest.raises(InvalidRequest):
        validate_request("qwen-image", {"prompt": "x", "steps": 30, "seed": -2})
    plus = validate_request(
        "qwen-image-edit-plus-product-photography",
        {"prompt": "x", "image_1": IMAGE, "seed": None},
        seed_source=lambda: 77,
    )
    assert plus.seed == 77


def test_edit_plus_needs_an_image_and_keeps_field_order() -> None:
    slug = "qwen-image-edit-plus-product-photography"
    with pytest.raises(InvalidRequest) as caught:
        validate_request(slug, {"prompt": "x"})
    assert caught.value.field == "image_1"
    request = validate_request(
        slug, {"prompt": "x", "image_3": IMAGE, "image_1": "https://e.x/a.png"}
    )
    assert [i.field for i in request.images] == ["image_1", "image_3"]
    assert request.lora == "product_photography" and request.steps == 8


def test_extra_loras_and_round_trip() -> None:
    slug = "qwen-image-edit-plus-product-photography"
    request = validate_request(
        slug,
        {
            "prompt": "x",
            "image_1": IMAGE,
            "lora_2_url": "https://huggingface.co/a/b/resolve/main/c.safetensors",
        },
    )
    assert [r.field for r in request.extra_loras] == ["lora_2_url"]
    from qwenserve.store.records import request_from_text, request_text

    assert request_from_text(request_text(request)) == request


def test_fast_and_base_share_weights_but_not_2512() -> None:
    assert MODELS["qwen-image"].recipe.base_weights == MODELS["qwen-image-fast"].recipe.base_weights
    assert MODELS["qwen-image-2512"].recipe.base_weights != MODELS["qwen-image"].recipe.base_weights
    assert MODELS["qwen-image-fast"].recipe.lightning is not None
    assert MODELS["qwen-image"].recipe.lightning is None


@pytest.mark.skipif(not SOURCE_SEEDS_DIR.is_dir(), reason="no ../shared/seeds beside this checkout")
@pytest.mark.parametrize("slug", sorted(SEEDED))
def test_seed_copy_matches_the_source(slug: str) -> None:
    """The copy a fresh clone tests against is the contract's source, to the byte."""
    name = f"{slug}.txt"
    assert (COPIED_SEEDS_DIR / name).read_bytes() == (SOURCE_SEEDS_DIR / name).read_bytes()
