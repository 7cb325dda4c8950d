"""Checking a raw request body against a slug's contract, field by field.

Every problem of a body is collected (unknown fields, missing required ones, wrong types, out of
range, not allowed, then the checks across fields) and refused as one ``InvalidRequest`` listing
each bad field, so a client fixes them all in one round trip. Nothing here can raise anything
else for any JSON value a client sends.
"""

from __future__ import annotations

import difflib
import math
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from qwenserve.catalog.models import MODELS
from qwenserve.catalog.request import GenerationRequest, ImageFormat, InputImage, LoraRef
from qwenserve.catalog.sizes import fix_size
from qwenserve.catalog.spec import EXTRA_LORA_FIELDS, ModelSpec, Param
from qwenserve.errors import FieldError, InvalidRequest, UnknownModel

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


class _Refused(ValueError):
    """One field's value is unusable; the message names the field."""


def _describe_range(param: Param) -> str:
    return f"{_fmt(param.minimum)} and {_fmt(param.maximum)}"


def _fmt(value: float | None) -> str:
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() else str(value)


def _check_range(param: Param, value: float) -> None:
    too_low = param.minimum is not None and value < param.minimum
    too_high = param.maximum is not None and value > param.maximum
    if too_low or too_high:
        raise _Refused(f"{param.name} must be between {_describe_range(param)}, got {value!r}")


def _coerce(param: Param, value: Any) -> Any:
    """Type-check one present, non-null value; returns it in its canonical Python type."""
    name = param.name
    if param.type == "boolean":
        if not isinstance(value, bool):
            raise _Refused(f"{name} must be a boolean (true or false)")
        return value
    if param.type == "integer":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Refused(f"{name} must be an integer")
        if isinstance(value, float):
            if not math.isfinite(value) or not value.is_integer():
                raise _Refused(f"{name} must be an integer, got {value!r}")
            value = int(value)
        _check_range(param, value)
        return value
    if param.type == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Refused(f"{name} must be a number")
        if not math.isfinite(value):
            raise _Refused(f"{name} must be a finite number")
        _check_range(param, value)
        return float(value)
    # string and uri
    if not isinstance(value, str):
        raise _Refused(f"{name} must be a string")
    if not is_text(value):
        raise _Refused(f"{name} is not valid text: it holds a lone UTF-16 surrogate")
    if param.allowed is not None and value not in param.allowed:
        allowed = ", ".join(repr(a) for a in param.allowed)
        raise _Refused(f"{name} must be one of {allowed}, got {value!r}")
    if param.type == "uri":
        _check_image_source(name, value)
    return value


def _check_image_source(name: str, value: str) -> None:
    """Syntax only: the media layer fetches and decodes it, with its own limits and guards."""
    stripped = value.strip()
    if not stripped:
        raise _Refused(f"{name} must not be empty")
    lowered = stripped[:16].lower()
    if lowered.startswith(("http://", "https://")):
        if len(stripped) > MAX_URL_CHARS:
            raise _Refused(f"{name} URL is longer than {MAX_URL_CHARS} characters")
        return
    if lowered.startswith("data:"):
        return
    if "://" in stripped[:32] or not _BASE64_RE.match(stripped[:4096]):
        raise _Refused(f"{name} must be an http(s) URL, a data URI or base64 image data")


def is_text(value: str) -> bool:
    """Whether ``value`` is text every consumer can take: JSON allows lone UTF-16 surrogates
    (``"\\ud800"``), which no UTF-8 encoder, tokenizer or database accepts."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _readable(name: str) -> str:
    """A client's string made safe to echo (lone surrogates written as escapes)."""
    return name if is_text(name) else name.encode("utf-8", "backslashreplace").decode("utf-8")


def unknown_field_error(
    spec: ModelSpec, name: str, *, names: Sequence[str] | None = None, accepted: str | None = None
) -> FieldError:
    """The refusal of ``name``, which ``spec`` does not take: why, where the catalog knows (a
    fixed-step or CFG-free slug, ``base64`` spelled otherwise), else the closest of ``names``
    (default: the slug's parameters); then ``accepted`` (default: the slug's parameters), so a
    dialect with its own fields (``api/openai_request.py``) hints and lists among both."""
    name = _readable(name)
    hint = ""
    if name in ("base64", "base_64"):
        hint = f"; this model spells it '{spec.base64_field}'"
    elif name == "steps" and spec.recipe.default_steps is not None:
        hint = f"; this model always runs {spec.recipe.default_steps} steps"
        if spec.recipe.fixed_sigma_grid:
            hint += ", the fixed sigma grid its weights were distilled for"
    elif name in ("guidance", "negative_prompt") and spec.param("guidance") is None:
        hint = "; this model always runs without CFG (guidance 1)"
    else:
        close = difflib.get_close_matches(name, list(names or spec.param_names), n=1)
        if close:
            hint = f"; did you mean '{close[0]}'?"
    listed = ", ".join(spec.param_names) if accepted is None else accepted
    return FieldError(
        name, f"unknown parameter '{name}' for {spec.slug}{hint} (accepted: {listed})"
    )


def validate_request(
    slug: str, body: Any, *, seed_source: SeedSource = _random_seed
) -> GenerationRequest:
    """Check ``body`` (a decoded JSON value) against ``slug``'s contract.

    Returns the typed request with defaults applied and the seed resolved.
    Raises UnknownModel for an unknown slug, and otherwise one InvalidRequest listing every bad
    field (``errors``; ``field`` is the first of them).
    """
    spec = get_model(slug)
    if not isinstance(body, Mapping):
        raise InvalidRequest("request body must be a JSON object")
    problems = [
        unknown_field_error(spec, str(name))
        for name in body
        if not isinstance(name, str) or spec.param(name) is None
    ]
    values: dict[str, Any] = {}
    for param in spec.params:
        raw = body.get(param.name)
        if raw is None:
            # Defaults fill, never block: only a parameter with nothing to fill is refused.
            if param.must_send:
                problems.append(FieldError(param.name, f"{param.name} is required"))
            else:
                values[param.name] = param.default if param.has_default else None
            continue
        try:
            values[param.name] = _coerce(param, raw)
        except _Refused as refused:
            problems.append(FieldError(param.name, str(refused)))
    problems.extend(_cross_field_problems(spec, values, {p.field for p in problems}))
    if problems:
        # Unknown fields first (as sent), then the page's order.
        order = {name: index for index, name in enumerate(spec.param_names)}
        problems.sort(key=lambda problem: order.get(problem.field, -1))
        raise InvalidRequest.from_errors(problems)
    return _build(spec, values, seed_source)


def _cross_field_problems(
    spec: ModelSpec, values: Mapping[str, Any], already_bad: set[str]
) -> list[FieldError]:
    """The checks past each field's type and range; a field already refused is not re-judged."""
    problems: list[FieldError] = []
    prompt = values.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            problems.append(FieldError("prompt", "prompt must not be empty"))
        elif len(prompt) > MAX_PROMPT_CHARS:
            problems.append(
                FieldError("prompt", f"prompt is longer than {MAX_PROMPT_CHARS} characters")
            )
    negative = values.get("negative_prompt")
    if isinstance(negative, str) and len(negative) > MAX_PROMPT_CHARS:
        problems.append(
            FieldError(
                "negative_prompt",
                f"negative_prompt is longer than {MAX_PROMPT_CHARS} characters",
            )
        )
    has_image = any(values.get(name) is not None for name in spec.image_fields)
    image_refused = any(name in already_bad for name in spec.image_fields)
    images_required = spec.recipe.max_input_images and not spec.recipe.images_optional
    if images_required and not has_image and not image_refused:
        fields = " or ".join(spec.image_fields)
        problems.append(
            FieldError(spec.image_fields[0], f"an input image is required: send {fields}")
        )
    for name in EXTRA_LORA_FIELDS:
        location = values.get(name)
        if location is None:
            continue
        if not location.strip():
            problems.append(FieldError(name, f"{name} must not be empty"))
        elif len(location) > MAX_URL_CHARS:
            problems.append(FieldError(name, f"{name} is longer than {MAX_URL_CHARS} characters"))
    return problems


def _build(spec: ModelSpec, values: dict[str, Any], seed_source: SeedSource) -> GenerationRequest:
    """The typed request from checked values (nothing left to refuse)."""
    recipe = spec.recipe
    images = tuple(
        InputImage(field=name, source=values[name])
        for name in spec.image_fields
        if values.get(name) is not None
    )
    extra_loras = tuple(
        LoraRef(field=name, location=values[name].strip())
        for name in EXTRA_LORA_FIELDS
        if values.get(name) is not None
    )
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
        prompt=cast(str, values["prompt"]),
        steps=int(steps),
        guidance=1.0 if guidance is None else float(guidance),
        seed=int(seed),
        image_format=cast(ImageFormat, values["image_format"]),
        quality=int(values["quality"]),
        base64=bool(values[spec.base64_field]),
        size=fix_size(
            recipe,
            width=values.get("width"),
            height=values.get("height"),
            aspect_ratio=values.get("aspect_ratio"),
            has_images=bool(images),
        ),
        negative_prompt=values.get("negative_prompt"),
        aspect_ratio=values.get("aspect_ratio"),
        width=values.get("width"),
        height=values.get("height"),
        images=images,
        lora=values.get("lora"),
        extra_loras=extra_loras,
    )
