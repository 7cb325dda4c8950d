"""OpenAI's images requests in the catalog's terms: which slug, how many jobs, and the Segmind
body each job is validated with (``api/jobs.submit``), so every slug rule stays the catalog's.

Mapping (the README's "OpenAI images API" section says the same):

* ``model``: a qwenserve slug, text-to-image on generations, edit on edits (the other kind is a
  400 naming ``model``; an unknown one a 404; the Qwen-Image 2.1 slugs serve both). Omitted:
  qwen-image-fast / qwen-image-edit-fast.
* ``n`` (1-10): that many jobs; an explicit seed S gives them S, S+1, …
* ``size``: ``auto`` (or none) is the slug's default; ``WxH`` is exact where the slug takes
  width/height, else its nearest aspect ratio; a slug that follows its input image's size takes
  only ``auto``.
* ``output_format`` → ``image_format``; ``output_compression`` (0-100) → ``quality`` (clamped
  into the slug's range). ``response_format``: omitted, each image carries both ``url`` and
  ``b64_json`` (DALL·E-style readers take ``url``, gpt-image-style ones ``b64_json``); ``url`` or
  ``b64_json`` asked for explicitly, only that one.
* ``quality``, ``style``, ``moderation``, ``user``, ``safety_identifier``, ``input_fidelity``:
  accepted and ignored; ``background`` ``transparent`` is refused (the images are opaque).
* Anything else is a slug parameter by its Segmind name (``extra_body``: steps, seed, guidance,
  negative_prompt, …), checked by the slug's contract like any Segmind request. An unknown name
  is refused with a hint among both vocabularies (``sizee``: did you mean ``size``?).

Every bad field is named in one 400: the checks here and the slug's contract together.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from qwenserve.api import idempotency
from qwenserve.catalog import MODELS, ModelSpec, validate_request
from qwenserve.catalog.sizes import parse_ratio
from qwenserve.catalog.validate import unknown_field_error
from qwenserve.errors import FieldError, InvalidRequest, UnknownModel
from qwenserve.store.base import Idempotency

MAX_IMAGES = 10
MAX_PARTIAL_IMAGES = 3
DEFAULT_GENERATION_MODEL = "qwen-image-fast"
DEFAULT_EDIT_MODEL = "qwen-image-edit-fast"
IGNORED = ("quality", "style", "moderation", "user", "safety_identifier", "input_fidelity")
OPENAI_FIELDS = frozenset(
    (
        "model",
        "prompt",
        "n",
        "size",
        "response_format",
        "output_format",
        "output_compression",
        "background",
        "stream",
        "partial_images",
        "image",
        "mask",
        *IGNORED,
    )
)
EDIT_ONLY = frozenset(("image", "mask"))
ResponseFormat = Literal["url", "b64_json"]
_T = TypeVar("_T")
_SIZE_RE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")


@dataclass(frozen=True)
class ImagesCall:
    """One OpenAI images request, decided: the slug, the Segmind body of each job and how to
    answer."""

    slug: str
    body: dict[str, Any]
    n: int
    response_format: ResponseFormat | None
    """None (not sent): each image carries both ``url`` and ``b64_json``."""
    output_format: str
    stream: bool
    partial_images: int
    edit: bool
    seeds: tuple[int, ...] = field(default=())
    idempotency_key: str | None = None
    """The ``Idempotency-Key`` header: the ``n`` jobs are one set under it."""

    def job_bodies(self) -> list[dict[str, Any]]:
        """The body of each of the ``n`` jobs (distinct explicit seeds when one was given)."""
        if not self.seeds:
            return [dict(self.body) for _ in range(self.n)]
        return [{**self.body, "seed": seed} for seed in self.seeds]

    def idempotency_records(self) -> list[Idempotency]:
        """One record per job, all hashing the whole set (``idempotency.for_set``): the same
        key and body replay every image, another body (``n`` too) is a 409. The bodies are
        validated here as ``jobs.submit`` will, so the hash is of the requests, not their
        spelling. Raises InvalidRequest as the submit would."""
        assert self.idempotency_key is not None
        requests = []
        for body in self.job_bodies():
            seeds = idempotency.SeedRecorder()
            requests.append((validate_request(self.slug, body, seed_source=seeds), seeds.drawn))
        answer = {
            "edit": self.edit,
            "response_format": self.response_format,
            "stream": self.stream,
            "partial_images": self.partial_images,
        }
        return idempotency.for_set(self.idempotency_key, self.slug, requests, answer=answer)


def parse_generation(body: Any) -> ImagesCall:
    """``POST /v1/images/generations``'s JSON body. Raises InvalidRequest / UnknownModel."""
    if not isinstance(body, Mapping):
        raise InvalidRequest("request body must be a JSON object")
    if "image" in body or "mask" in body:
        name = "image" if "image" in body else "mask"
        raise InvalidRequest(f"{name}: send images to /v1/images/edits", field=name)
    return _parse(body, (), edit=False)


def parse_edit(fields: Mapping[str, Any], images: Sequence[str]) -> ImagesCall:
    """``POST /v1/images/edits``: the form's fields (strings, as multipart sends them) and
    its images (base64). Raises InvalidRequest / UnknownModel."""
    problems: list[FieldError] = []
    if "mask" in fields:
        problems.append(
            FieldError(
                "mask",
                "mask: Qwen-Image edits follow the prompt over the whole image and take no "
                "mask; describe the region to change in the prompt",
            )
        )
    if not images:
        problems.append(FieldError("image", "image is required: send one or more image files"))
    body = _from_form(fields, _model(fields, edit=True))
    return _parse(body, images, edit=True, problems=problems)


def _model(body: Mapping[str, Any], *, edit: bool) -> ModelSpec:
    name = body.get("model")
    if name is None:
        name = DEFAULT_EDIT_MODEL if edit else DEFAULT_GENERATION_MODEL
    if not isinstance(name, str):
        raise InvalidRequest("model must be a string (a qwenserve model slug)", field="model")
    spec = MODELS.get(name)
    if spec is None:
        raise UnknownModel(
            f"model '{name}' not found; available models: {', '.join(sorted(MODELS))}",
            field="model",
        )
    # Qwen-Image 2.1 slugs do both: generations (no references) and edits.
    serves = spec.edits_images if edit else spec.generates_from_text
    if not serves:
        is_edit = not edit
        kind, route = ("an edit", "/v1/images/edits") if is_edit else ("a text-to-image", "")
        where = f"; use {route}" if route else "; use /v1/images/generations"
        raise InvalidRequest(f"model '{name}' is {kind} model{where}", field="model")
    return spec


def _from_form(fields: Mapping[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """Multipart sends every value as text: numbers and booleans back to their types (by the
    OpenAI field, or the slug parameter's declared type); what does not parse stays text and
    the contract names it."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        kind = {"n": "integer", "output_compression": "integer", "partial_images": "integer"}.get(
            name, "boolean" if name == "stream" else None
        )
        param = spec.param(name)
        if kind is None and param is not None:
            kind = param.type
        out[name] = _typed(value, kind)
    return out


def _typed(value: Any, kind: str | None) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            return float(text)
    except ValueError:
        return value
    if kind == "boolean" and text.lower() in ("true", "false"):
        return text.lower() == "true"
    return value


def _parse(
    body: Mapping[str, Any],
    images: Sequence[str],
    *,
    edit: bool,
    problems: list[FieldError] | None = None,
) -> ImagesCall:
    spec = _model(body, edit=edit)
    problems = problems if problems is not None else []

    def check(step: Callable[[], _T], default: _T) -> _T:
        """``step()``, or ``default`` with its refusal kept: every bad field in one 400."""
        try:
            return step()
        except InvalidRequest as refused:
            problems.extend(refused.errors)
            return default

    n = check(lambda: _int_field(body, "n", 1, 1, MAX_IMAGES), 1)
    stream = check(lambda: _stream(body), False)
    partial = check(lambda: _int_field(body, "partial_images", 0, 0, MAX_PARTIAL_IMAGES), 0)
    if stream and n > 1:
        problems.append(FieldError("n", "n must be 1 when streaming"))
    response_format = check(lambda: _response_format(body), None)
    check(lambda: _background(body), None)
    for name in IGNORED:
        if body.get(name) is not None and not isinstance(body[name], str):
            problems.append(FieldError(name, f"{name} must be a string"))

    mapped: dict[str, Any] = {}
    none: dict[str, Any] = {}  # what a refused mapping adds
    if body.get("prompt") is not None:
        mapped["prompt"] = body["prompt"]
    mapped.update(check(lambda: _size(spec, body.get("size")), none))
    mapped.update(check(lambda: _output_format(body), none))
    if body.get("output_compression") is not None:
        compression = check(lambda: _int_field(body, "output_compression", 100, 0, 100), None)
        if compression is not None:
            mapped["quality"] = _quality(spec, compression)
    mapped.update(check(lambda: _images(spec, images), none))

    segmind = dict(mapped)
    for name, value in body.items():
        if name in OPENAI_FIELDS:
            continue
        if name in ("base64", "base_64") or name in spec.image_fields:
            problems.append(
                FieldError(name, f"{name} is set by the OpenAI API (response_format, image)")
            )
        elif spec.param(name) is None:
            problems.append(_unknown_field(spec, name, edit=edit))
        elif name in mapped:
            problems.append(
                FieldError(name, f"{name} conflicts with the OpenAI field that sets it")
            )
        else:
            segmind[name] = value
    if problems:
        raise InvalidRequest.from_errors(problems + _contract_problems(spec, segmind, problems))
    image_format = segmind.get("image_format")
    format_param = spec.param("image_format")
    if image_format is None:
        image_format = format_param.default if format_param is not None else "png"
    seed = segmind.get("seed")
    seeds: tuple[int, ...] = ()
    if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 and n > 1:
        seeds = tuple(seed + i for i in range(n))
    return ImagesCall(
        slug=spec.slug,
        body=segmind,
        n=n,
        response_format=response_format,
        output_format=str(image_format),
        stream=stream,
        partial_images=partial if stream else 0,
        edit=edit,
        seeds=seeds,
    )


def accepted_fields(spec: ModelSpec, *, edit: bool) -> tuple[list[str], list[str]]:
    """The names a body may hold on this route: OpenAI's, then the slug's own Segmind ones
    (less those the OpenAI fields set: the image fields and ``base64``)."""
    openai = sorted(n for n in OPENAI_FIELDS if n != "mask" and (edit or n not in EDIT_ONLY))
    own = [
        name
        for name in spec.param_names
        if name not in OPENAI_FIELDS
        and name not in spec.image_fields
        and name not in ("base64", "base_64")
    ]
    return openai, own


def _unknown_field(spec: ModelSpec, name: str, *, edit: bool) -> FieldError:
    """The catalog's refusal, hinting and listing among both vocabularies (``sizee``:
    ``size``), with its own reason where it has one (``steps`` on a fixed-step slug)."""
    openai, own = accepted_fields(spec, edit=edit)
    accepted = f"{', '.join(openai)}; and {spec.slug}'s own: {', '.join(own)}"
    return unknown_field_error(spec, name, names=[*openai, *own], accepted=accepted)


def _contract_problems(
    spec: ModelSpec, segmind: Mapping[str, Any], known: Sequence[FieldError]
) -> list[FieldError]:
    """What the slug's contract says of the rest of a body already refused here, so the one
    400 names every bad field (those named already are not named twice)."""
    named = {problem.field for problem in known}
    try:
        validate_request(spec.slug, dict(segmind), seed_source=lambda: 0)
    except InvalidRequest as refused:
        return [problem for problem in refused.errors if problem.field not in named]
    return []


def _stream(body: Mapping[str, Any]) -> bool:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream must be a boolean", field="stream")
    return bool(stream)


def _response_format(body: Mapping[str, Any]) -> ResponseFormat | None:
    value = body.get("response_format")
    if value is None or value == "url" or value == "b64_json":
        return value
    raise InvalidRequest("response_format must be 'url' or 'b64_json'", field="response_format")


def _background(body: Mapping[str, Any]) -> None:
    if body.get("background") not in (None, "auto", "opaque"):
        raise InvalidRequest(
            "background must be 'auto' or 'opaque': the images have no transparency",
            field="background",
        )


def _output_format(body: Mapping[str, Any]) -> dict[str, Any]:
    output_format = body.get("output_format")
    if output_format is None:
        return {}
    if output_format not in ("png", "jpeg", "webp"):
        raise InvalidRequest("output_format must be 'png', 'jpeg' or 'webp'", field="output_format")
    return {"image_format": output_format}


def _int_field(body: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer from {low} to {high}", field=name)
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be from {low} to {high}, got {value}", field=name)
    return value


def _size(spec: ModelSpec, size: Any) -> dict[str, Any]:
    """``WxH`` in the slug's terms: exact width/height, else the nearest aspect ratio."""
    if size is None or size == "auto":
        return {}
    match = _SIZE_RE.match(size) if isinstance(size, str) else None
    width, height = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if width < 1 or height < 1:
        raise InvalidRequest(
            f"size must be 'auto' or WIDTHxHEIGHT (e.g. '1024x1024'), got {size!r}", field="size"
        )
    width_param, height_param = spec.param("width"), spec.param("height")
    if width_param is not None and height_param is not None:
        for side, param in ((width, width_param), (height, height_param)):
            if (param.minimum is not None and side < param.minimum) or (
                param.maximum is not None and side > param.maximum
            ):
                raise InvalidRequest(
                    f"size {size!r}: {spec.slug} takes each side from {param.minimum:g} to "
                    f"{param.maximum:g} pixels",
                    field="size",
                )
        return {"width": width, "height": height}
    ratio_param = spec.param("aspect_ratio")
    if ratio_param is not None and ratio_param.allowed:
        wanted = math.log(width / height)
        ratios = [r for r in ratio_param.allowed if ":" in r]
        best = min(ratios, key=lambda r: abs(math.log(parse_ratio(r)) - wanted))
        return {"aspect_ratio": best}
    raise InvalidRequest(
        f"size {size!r}: {spec.slug} makes its image the size of the input image; send size='auto'",
        field="size",
    )


def _quality(spec: ModelSpec, compression: int) -> int:
    param = spec.param("quality")
    low = int(param.minimum) if param is not None and param.minimum is not None else 1
    high = int(param.maximum) if param is not None and param.maximum is not None else 100
    return min(max(compression, low), high)


def _images(spec: ModelSpec, images: Sequence[str]) -> dict[str, str]:
    if not images:
        return {}
    fields = spec.image_fields
    if len(images) > len(fields):
        raise InvalidRequest(
            f"image: {spec.slug} takes at most {len(fields)} image(s), got {len(images)}",
            field="image",
        )
    return dict(zip(fields, images, strict=False))
