"""Checking a raw request body against a slug's contract, field by field.

Every refusal is one ``InvalidRequest`` naming the field and what is allowed; nothing here can
raise anything else for any JSON value a client sends.
"""

from __future__ import annotations

import difflib
import math
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any, cast

from qwenserve.catalog.models import MODELS
from qwenserve.catalog.request import GenerationRequest, ImageFormat, InputImage, LoraRef
from qwenserve.catalog.spec import ModelSpec, Param
from qwenserve.errors import InvalidRequest, UnknownModel

MAX_PROMPT_CHARS = 10_000
MAX_URL_CHARS = 4_096
# Seeds drawn for -1/null fit every slug's range (the smallest ceiling is 2147483647).
RANDOM_SEED_CEILING = 2**31 - 1

_BASE64_RE = re.compile(r"^[A-Za-z0-9+/=_\-\s]+$")

SeedSource = Callable[[], int]


def _random_seed() -> int:
    return secrets.randbelow(RANDOM_SEED_CEILING + 1)


def get_model(slug: str) -> ModelSpec:
    """The spec for ``slug``; raises UnknownModel naming the slugs that exist."""
    spec = MODELS.get(slug)
    if spec is None:
        raise UnknownModel(
            f"model '{slug}' not found; available models: {', '.join(sorted(MODELS))}"
        )
    return spec


def _describe_range(param: Param) -> str:
    return f"{_fmt(param.minimum)} to {_fmt(param.maximum)}"


def _fmt(value: float | None) -> str:
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() else str(value)


def _check_range(param: Param, value: float) -> None:
    too_low = param.minimum is not None and value < param.minimum
    too_high = param.maximum is not None and value > param.maximum
    if too_low or too_high:
        raise InvalidRequest(
            f"{param.name} must be between {_describe_range(param)}, got {value!r}",
            field=param.name,
        )


def _coerce(param: Param, value: Any) -> Any:
    """Type-check one present, non-null value; returns it in its canonical Python type."""
    name = param.name
    if param.type == "boolean":
        if not isinstance(value, bool):
            raise InvalidRequest(f"{name} must be a boolean (true or false)", field=name)
        return value
    if param.type == "integer":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest(f"{name} must be an integer", field=name)
        if isinstance(value, float):
            if not math.isfinite(value) or not value.is_integer():
                raise InvalidRequest(f"{name} must be an integer, got {value!r}", field=name)
            value = int(value)
        _check_range(param, value)
        return value
    if param.type == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest(f"{name} must be a number", field=name)
        if not math.isfinite(value):
            raise InvalidRequest(f"{name} must be a finite number", field=name)
        _check_range(param, value)
        return float(value)
    # string and uri
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string", field=name)
    if param.allowed is not None and value not in param.allowed:
        allowed = ", ".join(repr(a) for a in param.allowed)
        raise InvalidRequest(f"{name} must be one of {allowed}, got {value!r}", field=name)
    if param.type == "uri":
        _check_image_source(name, value)
    return value


def _check_image_source(name: str, value: str) -> None:
    """Syntax only: the media layer fetches and decodes it, with its own limits and guards."""
    stripped = value.strip()
    if not stripped:
        raise InvalidRequest(f"{name} must not be empty", field=name)
    lowered = stripped[:16].lower()
    if lowered.startswith(("http://", "https://")):
        if len(stripped) > MAX_URL_CHARS:
            raise InvalidRequest(
                f"{name} URL is longer than {MAX_URL_CHARS} characters", field=name
            )
        return
    if lowered.startswith("data:"):
        return
    if "://" in stripped[:32]:
        raise InvalidRequest(
            f"{name} must be an http(s) URL, a data URI or base64 image data", field=name
        )
    if not _BASE64_RE.match(stripped[:4096]):
        raise InvalidRequest(
            f"{name} must be an http(s) URL, a data URI or base64 image data", field=name
        )


def _unknown_field_error(spec: ModelSpec, name: str) -> InvalidRequest:
    hint = ""
    if name in ("base64", "base_64"):
        hint = f"; this model spells it '{spec.base64_field}'"
    else:
        close = difflib.get_close_matches(name, spec.param_names, n=1)
        if close:
            hint = f"; did you mean '{close[0]}'?"
    return InvalidRequest(
        f"unknown parameter '{name}' for {spec.slug}{hint} "
        f"(accepted: {', '.join(spec.param_names)})",
        field=name,
    )


def validate_request(
    slug: str, body: Any, *, seed_source: SeedSource = _random_seed
) -> GenerationRequest:
    """Check ``body`` (a decoded JSON value) against ``slug``'s contract.

    Returns the typed request with defaults applied and the seed resolved.
    Raises UnknownModel for an unknown slug and InvalidRequest (naming the field) otherwise.
    """
    spec = get_model(slug)
    if not isinstance(body, Mapping):
        raise InvalidRequest("request body must be a JSON object")
    for name in body:
        if not isinstance(name, str) or spec.param(name) is None:
            raise _unknown_field_error(spec, str(name))

    values: dict[str, Any] = {}
    for param in spec.params:
        raw = body.get(param.name)
        if raw is None:
            if param.required:
                hint = f" (suggested value: {param.default!r})" if param.has_default else ""
                raise InvalidRequest(f"{param.name} is required{hint}", field=param.name)
            values[param.name] = param.default if param.has_default else None
            continue
        values[param.name] = _coerce(param, raw)
    return _build(spec, values, seed_source)


def _build(spec: ModelSpec, values: dict[str, Any], seed_source: SeedSource) -> GenerationRequest:
    recipe = spec.recipe
    prompt = cast(str, values["prompt"])
    if not prompt.strip():
        raise InvalidRequest("prompt must not be empty", field="prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"prompt is longer than {MAX_PROMPT_CHARS} characters", field="prompt")
    negative = values.get("negative_prompt")
    if isinstance(negative, str) and len(negative) > MAX_PROMPT_CHARS:
        raise InvalidRequest(
            f"negative_prompt is longer than {MAX_PROMPT_CHARS} characters",
            field="negative_prompt",
        )

    images = tuple(
        InputImage(field=name, source=values[name])
        for name in spec.image_fields
        if values.get(name) is not None
    )
    if recipe.max_input_images and not images:
        fields = " or ".join(spec.image_fields)
        raise InvalidRequest(
            f"an input image is required: send {fields}", field=spec.image_fields[0]
        )

    extra_loras: list[LoraRef] = []
    for name in ("lora_2_url", "lora_3_url"):
        location = values.get(name)
        if location is None:
            continue
        if not location.strip():
            raise InvalidRequest(f"{name} must not be empty", field=name)
        if len(location) > MAX_URL_CHARS:
            raise InvalidRequest(f"{name} is longer than {MAX_URL_CHARS} characters", field=name)
        extra_loras.append(LoraRef(field=name, location=location.strip()))

    seed = values.get("seed")
    if seed is None or seed == -1:
        seed = seed_source()

    steps = values.get("steps")
    if steps is None:
        steps = recipe.default_steps
    if steps is None:  # pragma: no cover - a catalog error, caught by the catalog tests
        raise AssertionError(f"{spec.slug} declares neither a steps parameter nor default_steps")

    guidance = values.get("guidance")
    return GenerationRequest(
        slug=spec.slug,
        prompt=prompt,
        steps=int(steps),
        guidance=1.0 if guidance is None else float(guidance),
        seed=int(seed),
        image_format=cast(ImageFormat, values["image_format"]),
        quality=int(values["quality"]),
        base64=bool(values[spec.base64_field]),
        negative_prompt=negative,
        aspect_ratio=values.get("aspect_ratio"),
        width=values.get("width"),
        height=values.get("height"),
        images=images,
        lora=values.get("lora"),
        extra_loras=tuple(extra_loras),
    )
