"""OpenAI's images API (``/v1/images/generations``, ``/v1/images/edits``) over the same job
path as Segmind's routes (``api/jobs.py``): the same keys (``Authorization: Bearer`` or
``x-api-key``), credits, rate limits and durability. One job per image: ``n`` jobs submitted
back to back, so a worker batches them; each is debited when accepted and refunded if it fails.

The request is mapped onto the slug's Segmind contract in ``openai_request.py``; errors render
in OpenAI's shape from the same error tree (``api/errors.py``, by route prefix). Sync answers
wait like Segmind v1 (``sync_timeout_s``); with ``stream: true`` the answer is OpenAI's image
SSE events (``openai_stream.py``). A caller that hangs up, a wait that times out, or a sibling
image that fails ends the request: its unfinished jobs are cancelled (refunded); images
already made stay charged (the response carries none of them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from qwenserve.api import jobs
from qwenserve.api.auth import CurrentKey
from qwenserve.api.errors import error_responses
from qwenserve.api.jobs import Submitted
from qwenserve.api.openai_request import ImagesCall, parse_edit, parse_generation
from qwenserve.api.openai_stream import SSE_PING_S, image_events
from qwenserve.api.services import Services
from qwenserve.errors import (
    Conflict,
    InvalidRequest,
    UnknownRequest,
    UpstreamTimeout,
    rebuild_error,
)
from qwenserve.jobs import Job, JobStatus
from qwenserve.store.base import ApiKey

router = APIRouter(tags=["OpenAI images"])
log = logging.getLogger("qwenserve.api")

MAX_FORM_FILES = 8
MAX_FORM_FIELDS = 64
IMAGES_RESPONSES = error_responses(
    *(400, 401, 403, 404, 406, 409, 413, 422, 429, 500, 502, 503, 504),
    meanings={
        422: "The content policy blocked it (`error.code`: `content_policy_violation`)",
        400: "Invalid parameters: `error.message` names every bad field, `error.param` the "
        "first one",
        409: "An image's job was cancelled meanwhile",
    },
    openai=True,
)


@router.post(
    "/v1/images/generations",
    summary="Generate images (OpenAI's images API)",
    responses=IMAGES_RESPONSES,
)
async def generations(request: Request, key: CurrentKey) -> Response:
    call = parse_generation(await jobs.read_json_body(request))
    return await _run(request, key, call)


@router.post(
    "/v1/images/edits",
    summary="Edit images (OpenAI's images API, multipart)",
    responses=IMAGES_RESPONSES,
)
async def edits(request: Request, key: CurrentKey) -> Response:
    fields, images = await _read_form(request)
    return await _run(request, key, parse_edit(fields, images))


async def _read_form(request: Request) -> tuple[dict[str, Any], list[str]]:
    """The multipart form: text fields, and the ``image`` / ``image[]`` parts as base64 (the
    inline-image path checks and stores them like any base64 input). A ``mask`` part is kept
    as a field so it is refused by name."""
    try:
        form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    except MultiPartException as error:
        raise InvalidRequest(f"malformed multipart body: {error.message}") from None
    fields: dict[str, Any] = {}
    images: list[str] = []
    try:
        for name, value in form.multi_items():
            base = name.removesuffix("[]")
            if base == "image":
                if not isinstance(value, UploadFile):
                    raise InvalidRequest("image must be an image file part", field="image")
                images.append(base64.b64encode(await value.read()).decode("ascii"))
            elif isinstance(value, UploadFile):
                fields[base] = "<file>"
            else:
                fields[base] = value
    finally:
        await form.close()
    return fields, images


async def _run(request: Request, key: ApiKey, call: ImagesCall) -> Response:
    services: Services = request.app.state.services
    submitted = await _submit_all(services, key, call)
    headers = {
        "x-request-id": ",".join(s.job.id for s in submitted),
        "x-remaining-credits": f"{submitted[-1].outcome.remaining_usd:.6f}",
    }
    if call.stream:
        return EventSourceResponse(
            image_events(services, request, key, submitted[0], call),
            ping=SSE_PING_S,
            headers={"Cache-Control": "no-store", **headers},
        )
    ended = await _await_all(services, request, key, submitted)
    data = [await _image_entry(services, request, job, call) for job in ended]
    first = ended[0].result
    assert first is not None
    return JSONResponse(
        {
            "created": int(services.clock()),
            "data": data,
            "output_format": call.output_format,
            "size": f"{first.width}x{first.height}",
            "background": "opaque",
            "quality": "auto",
        },
        headers=headers,
    )


async def _submit_all(services: Services, key: ApiKey, call: ImagesCall) -> list[Submitted]:
    """The ``n`` jobs; if one is refused (429, 406), those accepted before it are cancelled
    (refunded) and the refusal is the answer: all or nothing. In-process workers are woken once
    all are in, so they claim them together (one batch) and none has ended before a refusal."""
    accepted: list[Submitted] = []
    try:
        for body in call.job_bodies():
            accepted.append(
                await jobs.submit(
                    services, key, call.slug, body, partial_images=call.partial_images, wake=False
                )
            )
    except BaseException:
        await _cancel(services, key, [s.job.id for s in accepted])
        raise
    if services.on_submitted is not None:
        for submitted in accepted:
            services.on_submitted(submitted.job.id)
    return accepted


async def _cancel(services: Services, key: ApiKey, job_ids: list[str]) -> None:
    for job_id in job_ids:
        with contextlib.suppress(Conflict, UnknownRequest):  # ended meanwhile: nothing to stop
            await jobs.cancel(services, key.id, job_id)


async def _await_all(
    services: Services, request: Request, key: ApiKey, submitted: list[Submitted]
) -> list[Job]:
    """Every job completed, or the first failure raised (its own error) after the unfinished
    ones are cancelled."""
    settings = services.settings
    watch = request.is_disconnected if settings.cancel_on_disconnect else None
    awaited = await asyncio.gather(
        *(
            jobs.await_end(services, s.job.id, settings.sync_timeout_s, disconnected=watch)
            for s in submitted
        )
    )
    done = [a.job for a in awaited if a.job is not None and a.job.status.is_terminal]
    failed = [job for job in done if job.status is JobStatus.FAILED]
    completed = [job for job in done if job.status is JobStatus.COMPLETED and job.result]
    if len(completed) == len(submitted):
        return completed
    unfinished = [s.job.id for s in submitted if s.job.id not in {j.id for j in done}]
    await _cancel(services, key, unfinished)
    if any(a.disconnected for a in awaited):
        log.info("images %s: the caller disconnected while waiting", ",".join(unfinished))
        raise UnknownRequest("the caller disconnected")
    if failed:
        raise rebuild_error(failed[0].error_kind, failed[0].error or "failed")
    if any(a.job is None for a in awaited):
        raise UnknownRequest("the request expired before it finished")
    raise UpstreamTimeout(
        f"no image within {settings.sync_timeout_s:g}s; the unfinished images were cancelled "
        "and refunded"
    )


async def _image_entry(
    services: Services, request: Request, job: Job, call: ImagesCall
) -> dict[str, Any]:
    result = job.result
    assert result is not None
    if call.response_format == "url":
        url = f"{services.base_url(request)}/media/{result.media_id}"
        return {"url": url, "revised_prompt": None}
    stored = await services.call(services.media.get, result.media_id, now=services.clock())
    if stored is None:
        raise UnknownRequest("the image expired before it was read")
    return {"b64_json": base64.b64encode(stored[0]).decode("ascii"), "revised_prompt": None}
