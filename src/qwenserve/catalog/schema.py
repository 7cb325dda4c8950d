"""Each slug's request body as a JSON Schema (draft 2020-12), generated from its contract, and
the model cards of ``GET /v1/models`` (OpenAI's list shape) built around it.

One generator for every reader: ``GET /v1/models/{slug}`` answers it, the OpenAPI document
(``/docs``) uses it as each slug's request body, and a UI can build a form from it. It says what
``validate_request`` enforces (types, ranges, allowed values, required fields, no unknown
fields, non-empty prompts, the image sources accepted), so a body the schema accepts is one the
API accepts; the API stays the judge of what no schema says (a URL's length, the image bytes).

What a UI can rely on: ``required`` lists only what must be sent (a page's "required" parameter
with a default is filled when omitted, so it is not listed); per property: ``type`` (fields a
client may omit also admit ``null``: "use the default"), ``description`` (the help text of the
Segmind page), ``default``, ``minimum`` / ``maximum`` (inclusive), ``enum``, and on image
fields ``"x-qwenserve-image": true`` with ``"contentMediaType": "image/*"``: an http(s) URL, a
``data:`` URI or raw base64 image bytes, so a form can offer an upload and send a data URI.
``x-order`` is the page's field order.
"""

from __future__ import annotations

from typing import Any

from qwenserve.catalog.spec import EXTRA_LORA_FIELDS, ModelSpec, Param
from qwenserve.catalog.validate import MAX_PROMPT_CHARS, MAX_URL_CHARS

# OpenAI's ``created`` (a Unix time): when these contracts were transcribed from the seed pages
# (2026-11-24 UTC). One date for every slug: the pages give none.
CATALOG_CREATED_AT = 1_795_478_400
OWNED_BY = "qwenserve"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
IMAGE_ANNOTATION = "x-qwenserve-image"
IMAGE_SOURCES = "An http(s) URL, a data: URI, or base64-encoded image bytes."
# What validate._check_image_source admits, in the ECMA-262 dialect JSON Schema uses (no inline
# flags, hence the spelled-out cases): http(s):// or data: after optional blanks, else base64.
IMAGE_SOURCE_PATTERN = (
    r"^\s*(?:[hH][tT][tT][pP][sS]?://|[dD][aA][tT][aA]:|[A-Za-z0-9+/=_-][A-Za-z0-9+/=_\s-]*$)"
)
# Texts must hold a visible character (a blank prompt is refused).
NOT_BLANK_PATTERN = r"\S"

_JSON_TYPES = {
    "string": "string",
    "uri": "string",
    "integer": "integer",
    "number": "number",
    "boolean": "boolean",
}


def input_schema(spec: ModelSpec) -> dict[str, Any]:
    """The JSON Schema of ``spec``'s request body (a fresh dict: callers may change it)."""
    properties = {
        p.name: _property(p, max_text=MAX_PROMPT_CHARS, max_url=MAX_URL_CHARS) for p in spec.params
    }
    schema: dict[str, Any] = {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": f"{spec.slug} request",
        "description": spec.summary,
        "type": "object",
        "properties": properties,
        "required": [p.name for p in spec.params if p.must_send],
        "additionalProperties": False,
    }
    images = spec.image_fields
    if (
        spec.recipe.max_input_images
        and not spec.recipe.images_optional
        and not any(_required(spec, name) for name in images)
    ):
        # At least one of the optional image fields, and not as null.
        schema["anyOf"] = [
            {"required": [name], "properties": {name: {"type": "string"}}} for name in images
        ]
    return schema


def _required(spec: ModelSpec, name: str) -> bool:
    param = spec.param(name)
    return param is not None and param.must_send


def _property(param: Param, *, max_text: int, max_url: int) -> dict[str, Any]:
    json_type = _JSON_TYPES[param.type]
    prop: dict[str, Any] = {
        # Fields a client may leave out admit null: validation reads it as "not sent" (the
        # default applies), a page's "required" with a default included.
        "type": json_type if param.must_send else [json_type, "null"],
        "description": param.description,
    }
    if param.has_default:
        prop["default"] = param.default
    if param.minimum is not None:
        prop["minimum"] = _bound(param, param.minimum)
    if param.maximum is not None:
        prop["maximum"] = _bound(param, param.maximum)
    if param.allowed is not None:
        prop["enum"] = [*param.allowed] if param.must_send else [*param.allowed, None]
    if param.type == "uri":
        prop["description"] = f"{param.description.rstrip('.')}. {IMAGE_SOURCES}"
        prop["contentMediaType"] = "image/*"
        prop[IMAGE_ANNOTATION] = True
        prop["pattern"] = IMAGE_SOURCE_PATTERN
    elif param.name == "prompt":
        prop.update(minLength=1, maxLength=max_text, pattern=NOT_BLANK_PATTERN)
    elif param.name == "negative_prompt":
        prop["maxLength"] = max_text
    elif param.name in EXTRA_LORA_FIELDS:
        prop.update(minLength=1, maxLength=max_url, pattern=NOT_BLANK_PATTERN)
    return prop


def _bound(param: Param, value: float) -> int | float:
    return int(value) if param.type == "integer" else value


def model_entry(spec: ModelSpec, price_usd: float) -> dict[str, Any]:
    """One entry of ``GET /v1/models``: OpenAI's model object plus what a picker shows.

    ``price_usd`` is the price this server charges (Settings may override the catalog's).
    ``weights`` is the Hugging Face repo id of the checkpoint it runs (a folder holds it at that
    path); ``distillation_lora`` the ``repo/filename`` of the LoRA the slug adds, or null.
    """
    lightning = spec.recipe.lightning
    return {
        "id": spec.slug,
        "object": "model",
        "created": CATALOG_CREATED_AT,
        "owned_by": OWNED_BY,
        "kind": spec.kind,
        "title": spec.title,
        "description": spec.summary,
        "price_usd": price_usd,
        "max_input_images": spec.recipe.max_input_images,
        "weights": spec.recipe.base_weights,
        "distillation_lora": (
            None if lightning is None else f"{lightning.repo}/{lightning.filename}"
        ),
    }


def model_card(spec: ModelSpec, price_usd: float) -> dict[str, Any]:
    """``GET /v1/models/{slug}``: the entry plus the request body's JSON Schema."""
    return {**model_entry(spec, price_usd), "input_schema": input_schema(spec)}
