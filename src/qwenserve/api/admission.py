"""Every check a request meets at submit, run together: one 400 names every bad field.

The stages are the catalog's contract (``validate_request``), the host of each input URL
(a private or loopback literal is refused before any charge), the prompt's length in the
pipeline's own tokens (``Services.prompt_tokens``) and the decoding of inline images. A client
that sends a bad ``image`` and no ``prompt`` hears of both at once, whichever stage finds each:
a field one stage refused is not judged again by a later one. Every route submits through
``api/jobs.submit``, so v1, v2 and the OpenAI dialect refuse the same bodies the same way.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from qwenserve.api.services import Services
from qwenserve.catalog import GenerationRequest, ModelSpec, validate_request
from qwenserve.catalog.request import InputImage
from qwenserve.catalog.spec import EXTRA_LORA_FIELDS
from qwenserve.catalog.validate import SeedSource
from qwenserve.errors import FieldError, InvalidRequest
from qwenserve.media.fetch import refuse_literal_private_host
from qwenserve.media.inline import inline_image_problems


async def admit(
    services: Services, spec: ModelSpec, body: Any, *, seed_source: SeedSource
) -> GenerationRequest:
    """The typed request for ``body``, or one InvalidRequest listing every bad field that any
    submit-time stage finds (inline images are decoded here only to name their problems; an
    accepted request's are decoded and stored once, by ``store_inline_images``).

    Raises UnknownModel for an unknown slug, InvalidRequest otherwise.
    """
    request: GenerationRequest | None = None
    problems: list[FieldError] = []
    try:
        request = validate_request(spec.slug, body, seed_source=seed_source)
    except InvalidRequest as invalid:
        problems.extend(invalid.errors)
    bad = {problem.field for problem in problems}
    sent = body if isinstance(body, Mapping) else {}
    images, urls = _inputs(spec, request, sent, bad)
    if not services.settings.allow_private_urls:
        problems.extend(private_url_problems(urls))
    problems.extend(await _token_problems(services, spec, request, sent, bad))
    if problems:
        judged = {problem.field for problem in problems}
        unjudged = [image for image in images if image.field not in judged]
        problems.extend(
            await services.call(
                inline_image_problems,
                unjudged,
                max_bytes=services.settings.max_input_bytes,
                max_pixels=services.settings.max_input_pixels,
            )
        )
        raise InvalidRequest.from_errors(_in_page_order(spec, problems))
    assert request is not None
    return request


def private_url_problems(urls: Sequence[tuple[str, str]]) -> list[FieldError]:
    """Input URLs (images, extra LoRAs) whose host is written as a private or loopback address;
    the worker re-checks what names resolve to."""
    problems: list[FieldError] = []
    for field, url in urls:
        if url.strip().lower().startswith(("http://", "https://")):
            try:
                refuse_literal_private_host(url.strip(), field=field)
            except InvalidRequest as refused:
                problems.extend(refused.errors)
    return problems


def _inputs(
    spec: ModelSpec, request: GenerationRequest | None, sent: Mapping[str, Any], bad: set[str]
) -> tuple[list[InputImage], list[tuple[str, str]]]:
    """The input images and every input URL (field, value): the request's, or for a refused
    body, those of its input fields that passed the contract on their own."""
    if request is not None:
        images = list(request.images)
        loras = [(lora.field, lora.location) for lora in request.extra_loras]
    else:
        images = [
            InputImage(name, sent[name])
            for name in spec.image_fields
            if name not in bad and isinstance(sent.get(name), str)
        ]
        loras = [
            (name, sent[name])
            for name in EXTRA_LORA_FIELDS
            if name not in bad and spec.param(name) is not None and isinstance(sent.get(name), str)
        ]
    return images, [(image.field, image.source) for image in images] + loras


async def _token_problems(
    services: Services,
    spec: ModelSpec,
    request: GenerationRequest | None,
    sent: Mapping[str, Any],
    bad: set[str],
) -> list[FieldError]:
    """A prompt (or, with CFG on, a negative prompt) longer than the pipeline takes, counted
    by its own tokenizer, a preset's trigger word included (as ``runtime/call.py`` sends it)."""
    recipe = spec.recipe
    limit = recipe.max_prompt_tokens
    counter = services.prompt_tokens
    if limit is None or counter is None:
        return []
    if request is not None:
        prompt: Any = request.prompt
        negative: Any = request.negative_prompt
        lora: Any = request.lora
        guidance: Any = request.guidance
    else:
        prompt, negative, lora = sent.get("prompt"), sent.get("negative_prompt"), sent.get("lora")
        guidance = sent.get("guidance")
    preset = recipe.preset_loras.get(lora) if isinstance(lora, str) else None
    texts = {"prompt": f"{preset.trigger if preset else ''}{prompt}" if prompt else None}
    cfg = isinstance(guidance, int | float) and "guidance" not in bad and guidance > 1.0
    if cfg and isinstance(negative, str) and negative.strip():
        texts["negative_prompt"] = negative
    problems: list[FieldError] = []
    for field, text in texts.items():
        if field in bad or not isinstance(text, str) or _under_any_count(text, limit):
            continue
        count = await services.call(counter, recipe, text)
        if count is not None and count > limit:
            problems.append(
                FieldError(
                    field,
                    f"{field} is {count} tokens long; this model takes at most {limit} "
                    "(roughly that many Chinese characters, or 4 times as many English ones)",
                )
            )
    return problems


def _under_any_count(text: str, limit: int) -> bool:
    """Whether ``text`` is too short to pass ``limit`` tokens, with no tokenizer: Qwen's are
    byte-level BPE, so every token covers at least one byte of the NFC-normalised text (NFC can
    lengthen it). Most prompts are that short: they skip the count (and its first load)."""
    return len(unicodedata.normalize("NFC", text).encode()) <= limit


def _in_page_order(spec: ModelSpec, problems: list[FieldError]) -> list[FieldError]:
    """Unknown fields (and body-level problems) first, then the seed page's order."""
    order = {name: index for index, name in enumerate(spec.param_names)}
    return sorted(problems, key=lambda problem: order.get(problem.field, -1))
