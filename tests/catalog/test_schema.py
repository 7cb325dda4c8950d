"""Each slug's JSON Schema against the seed pages' example bodies and against validate_request:
the same bodies accepted, the same refused (out of range, wrong type, bad enum, missing
required, unknown field, blank prompt, bad image source)."""

from __future__ import annotations

from typing import Any

import pytest
from jsonschema import Draft202012Validator

from qwenserve.catalog import ALL_MODELS, MODELS, ModelSpec, input_schema, validate_request
from qwenserve.catalog.schema import IMAGE_ANNOTATION
from qwenserve.errors import FieldError, InvalidRequest
from tests.catalog.seed_pages import read_examples
from tests.catalog.test_contract import IMAGE, SEEDED, minimal_body

SLUGS = [m.slug for m in ALL_MODELS]
WRONG_TYPES: dict[str, list[Any]] = {
    "integer": ["8", True, 1.5, [1], {"a": 1}],
    "number": ["3.5", False, [1.0], {"a": 1}],
    "boolean": ["true", 1, 0],
    "string": [5, True, ["x"], {"x": 1}],
    "uri": [5, False, ["x"]],
}


def api_accepts(slug: str, body: Any) -> bool:
    try:
        validate_request(slug, body, seed_source=lambda: 7)
    except InvalidRequest:
        return False
    return True


def good_bodies(spec: ModelSpec) -> list[dict[str, Any]]:
    base = minimal_body(spec.slug)
    examples = read_examples(spec.slug) if spec.slug in SEEDED else []
    bodies = [base, *examples]
    for param in spec.params:
        if param.has_default and param.default is not None:
            bodies.append({**base, param.name: param.default})
        if not param.must_send and param.name not in base:
            bodies.append({**base, param.name: None})  # null: "use the default"
        if param.minimum is not None and param.maximum is not None:
            for bound in (param.minimum, param.maximum):
                value = int(bound) if param.type == "integer" else bound
                bodies.append({**base, param.name: value})
        if param.type == "integer" and param.minimum is not None:
            bodies.append({**base, param.name: float(int(param.minimum))})  # 8.0 is an integer
        for value in param.allowed or ():
            bodies.append({**base, param.name: value})
        if param.type == "uri":
            for source in ("https://example.com/a.png", f"data:image/png;base64,{IMAGE}", IMAGE):
                bodies.append({**base, param.name: source})
    if "negative_prompt" in spec.param_names:
        bodies.append({**base, "negative_prompt": ""})
    return bodies


def bad_bodies(spec: ModelSpec) -> list[dict[str, Any]]:
    base = minimal_body(spec.slug)
    bodies: list[dict[str, Any]] = [
        {**base, "negative_promt": "x"},  # unknown (a typo)
        {**base, "bogus": 1},
        {**base, "prompt": ""},
        {**base, "prompt": "   "},
    ]
    for param in spec.params:
        if param.must_send:
            bodies.append({k: v for k, v in base.items() if k != param.name})
            bodies.append({**base, param.name: None})
        if param.minimum is not None and param.maximum is not None:
            step = 1 if param.type == "integer" else 0.01
            bodies.append({**base, param.name: param.minimum - step})
            bodies.append({**base, param.name: param.maximum + step})
        if param.allowed:
            for value in ("bogus", param.allowed[0].upper() + "X", ""):
                bodies.append({**base, param.name: value})
        for value in WRONG_TYPES[param.type]:
            bodies.append({**base, param.name: value})
        if param.type == "uri":
            for source in ("", "   ", "ftp://example.com/a.png", "not base64!"):
                bodies.append({**base, param.name: source})
    if spec.slug == "qwen-image-edit-plus-product-photography":
        bodies.append({"prompt": "x"})  # no image at all
        bodies.append({"prompt": "x", "image_1": None, "image_2": None})
    return bodies


@pytest.mark.parametrize("slug", SLUGS)
def test_schema_is_valid_2020_12_and_describes_every_parameter(slug: str) -> None:
    spec = MODELS[slug]
    schema = input_schema(spec)
    Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    assert list(schema["properties"]) == list(spec.param_names)
    assert schema["required"] == [p.name for p in spec.params if p.must_send]
    for param in spec.params:
        prop = schema["properties"][param.name]
        assert prop["description"].startswith(param.description.rstrip("."))
        assert prop.get(IMAGE_ANNOTATION, False) is (param.type == "uri")
        if param.type == "uri":
            assert prop["contentMediaType"] == "image/*"
        if param.has_default:
            assert prop["default"] == param.default


@pytest.mark.parametrize("slug", SEEDED)
def test_seed_page_examples_are_valid(slug: str) -> None:
    examples = read_examples(slug)
    assert examples, "every page has an example body"
    validator = Draft202012Validator(input_schema(MODELS[slug]))
    for body in examples:
        assert list(validator.iter_errors(body)) == [], body
        assert api_accepts(slug, body), body


@pytest.mark.parametrize("slug", SLUGS)
def test_schema_and_api_agree_on_good_bodies(slug: str) -> None:
    validator = Draft202012Validator(input_schema(MODELS[slug]))
    for body in good_bodies(MODELS[slug]):
        assert validator.is_valid(body), body
        assert api_accepts(slug, body), body


@pytest.mark.parametrize("slug", SLUGS)
def test_schema_and_api_agree_on_bad_bodies(slug: str) -> None:
    validator = Draft202012Validator(input_schema(MODELS[slug]))
    for body in bad_bodies(MODELS[slug]):
        assert not validator.is_valid(body), body
        assert not api_accepts(slug, body), body


def test_every_bad_field_is_listed_at_once() -> None:
    body = {"prompt": "x", "steps": 17, "aspect_ratio": "5:4", "sede": 3}
    with pytest.raises(InvalidRequest) as caught:
        validate_request("qwen-image-fast", body)
    error = caught.value
    assert [e.field for e in error.errors] == ["sede", "steps", "aspect_ratio"]
    assert error.field == "sede"
    for problem in error.errors:
        assert problem.message in error.message
    assert "steps must be between 1 and 16, got 17" in error.message
    assert "did you mean 'seed'" in error.message


def test_a_single_bad_field_reads_as_before() -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_request("qwen-image-fast", {"prompt": "x", "steps": 17})
    assert caught.value.message == "steps must be between 1 and 16, got 17"
    assert caught.value.errors == (FieldError("steps", caught.value.message),)


def test_a_refused_image_is_not_also_reported_missing() -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_request("qwen-image-edit-plus-product-photography", {"prompt": "", "image_1": 5})
    assert [e.field for e in caught.value.errors] == ["prompt", "image_1"]
    with pytest.raises(InvalidRequest) as caught:
        validate_request("qwen-image-edit-fast", {"prompt": "x", "steps": 8})
    assert [e.field for e in caught.value.errors] == ["image"]
