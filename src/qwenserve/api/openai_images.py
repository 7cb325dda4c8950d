"""OpenAI's images API (``/v1/images/generations``, ``/v1/images/edits``) over the same job
path as Segmind's routes (``api/jobs.py``): the same keys (``Authorization: Bearer`` or
``x-api-key``), credits, rate limits and durability. One job per image: ``n`` jobs submitted
back to back, so a worker batches them; each is debited when accepted and refunded if it fails.

The request is mapped onto the slug's Segmind contract in ``openai_request.py``; errors render
in OpenAI's shape from the same error tree (``api/errors.py``, by route prefix). Sync answers
wait like Segmind v1 (``sync_timeout_s``); with ``stream: true`` the answer is OpenAI's image
SSE events (``openai_stream.py``). A caller that hangs up, a wait that times out, or a sibling
image that fails ends the request: its unfinished jobs are cancelled (refunded); images
already made stay charged (the response carries none of them). With an ``Idempotency-Key``
(as on v1/v2) the ``n`` jobs are one set: a retry with the same key and body answers the same
images, charging nothing; another body is a 409; a caller that hangs up or times out leaves
its jobs for the retry.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from qwenserve.api import idempotency, jobs
from qwenserve.api.auth import CurrentKey
from qwenserve.api.docs import START_TIMEOUT_OPENAPI
from qwenserve.api.errors import error_responses
from qwenserve.api.jobs import Submitted
from qwenserve.api.openai_request import ImagesCall, parse_edit, parse_generation
from qwenserve.api.openai_stream import SSE_PING_S, image_events
from qwenserve.api.schemas import EVENT_STREAM, ImagesBody
from qwenserve.api.services import Services
from qwenserve.errors import (
    Conflict,
    InvalidRequest,
    UnknownRequest,
    UpstreamTimeout,
    rebuild_error,
)
from qwenserve.jobs import Job, JobStatus
from qwenserve.store.base import ApiKey, Idempotency

router = APIRouter(tags=["OpenAI images"])
log = logging.getLogger("qwenserve.api")

MAX_FORM_FILES = 8
MAX_FORM_FIELDS = 64
IMAGES_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": ImagesBody,
        "description": "The images; with `stream`, OpenAI's image events",
        "content": EVENT_STREAM,
    },
    **error_responses(
        *(400, 401, 403, 404, 406, 409, 413, 422, 429, 500, 502, 503, 504),
        meanings={
            422: "The content policy blocked it (`error.code`: `content_policy_violation`)",
            400: "Invalid parameters: `error.message` names every bad field, `error.param` the "
            "first one",
            409: "An image's job was cancelled meanwhile, or the Idempotency-Key was used with "
            "another body",
        },
        openai=True,
    ),
}


@router.post(
    "/v1/images/generations",
    summary="Generate images (OpenAI's images API)",
    responses=IMAGES_RESPONSES,
    openapi_extra=START_TIMEOUT_OPENAPI,
)
async def generations(request: Request, key: CurrentKey) -> Response:
    call = parse_generation(await jobs.read_json_body(request))
    return await _run(request, key, call)


@router.post(
    "/v1/images/edits",
    summary="Edit images (OpenAI's images API, multipart)",
    responses=IMAGES_RESPONSES,
    openapi_extra=START_TIMEOUT_OPENAPI,
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
    call = dataclasses.replace(call, idempotency_key=idempotency.header_value(request))
    submitted = await _submit_all(services, key, call, jobs.start_timeout(request))
    headers = {
        "x-request-id": ",".join(s.job.id for s in submitted),
        "x-remaining-credits": f"{submitted[-1].outcome.remaining_usd:.6f}",
    }
    if all(s.replayed for s in submitted):
        headers["Idempotent-Replayed"] = "true"
    if call.stream:
        return EventSourceResponse(
            image_events(services, request, key, submitted[0], call),
            ping=SSE_PING_S,
            headers={"Cache-Control": "no-store", **headers},
        )
    ended = await _await_all(services, request, key, submitted, call)
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
            # No `quality`: the SDK's type allows low/medium/high/…, not "auto", and the
            # request's own is ignored (openai_request.py).
        },
        headers=headers,
    )


async def _submit_all(
    services: Services, key: ApiKey, call: ImagesCall, start_timeout_s: float | None = None
) -> list[Submitted]:
    """The ``n`` jobs (each with the start deadline ``start_timeout_s``, ``X-Start-Timeout``);
    if one is refused (429, 406, 503), those accepted before it are cancelled
    (refunded) and the refusal is the answer: all or nothing. In-process workers are woken once
    all are in, so they claim them together (one batch) and none has ended before a refusal.
    With an ``Idempotency-Key`` the jobs are one set (``ImagesCall.idempotency_records``): a
    retry replays all of them, charging nothing."""
    bodies = call.job_bodies()
    records: list[Idempotency | None] = [None] * len(bodies)
    if call.idempotency_key is not None:
        records = list(call.idempotency_records())
    accepted: list[Submitted] = []
    try:
        for body, record in zip(bodies, records, strict=True):
            accepted.append(
                await jobs.submit(
                    services,
                    key,
                    call.slug,
                    body,
                    partial_images=call.partial_images,
                    wake=False,
                    idempotency_record=record,
                    start_timeout_s=start_timeout_s,
                )
            )
    except BaseException:
        await _cancel(services, key, [s.job.id for s in accepted])
        raise
    if services.on_submitted is not None:
        for submitted in accepted:
            if not submitted.replayed:
                services.on_submitted(submitted.job.id)
    return accepted


async def _cancel(services: Services, key: ApiKey, job_ids: list[str]) -> None:
    for job_id in job_ids:
        with contextlib.suppress(Conflict, UnknownRequest):  # ended meanwhile: nothing to stop
            await jobs.cancel(services, key.id, job_id)


async def _await_all(
    services: Services, request: Request, key: ApiKey, submitted: list[Submitted], call: ImagesCall
) -> list[Job]:
    """Every job completed, or the first failure raised (its own error) after the unfinished
    ones are cancelled. With an ``Idempotency-Key`` a caller that hangs up or times out will
    retry: its jobs are kept for the retry (as on v1)."""
    settings = services.settings
    keep = call.idempotency_key is not None
    watch = request.is_disconnected if settings.cancel_on_disconnect and not keep else None
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
    if failed or not keep:
        await _cancel(services, key, unfinished)
    if any(a.disconnected for a in awaited):
        log.info("images %s: the caller disconnected while waiting", ",".join(unfinished))
        raise UnknownRequest("the caller disconnected")
    if failed:
        raise rebuild_error(failed[0].error_kind, failed[0].error or "failed")
    if any(a.job is None for a in awaited):
        raise UnknownRequest("the request expired before it finished")
    if keep:
        raise UpstreamTimeout(
            f"no image within {settings.sync_timeout_s:g}s; the images go on: retry with the "
            "same Idempotency-Key to wait for them"
        )
    raise UpstreamTimeout(
        f"no image within {settings.sync_timeout_s:g}s; the unfinished images were cancelled "
        "and refunded"
    )


async def _image_entry(
    services: Services, request: Request, job: Job, call: ImagesCall
) -> dict[str, Any]:
    """Per ``response_format``: ``url``, ``b64_json``, or (not sent) both, so DALL·E-style
    readers (``data[0].url``) and gpt-image-style ones (``b64_json``) both find theirs."""
    result = job.result
    assert result is not None
    entry: dict[str, Any] = {}
    if call.response_format in ("url", None):
        entry["url"] = f"{services.base_url(request)}/media/{result.media_id}"
    if call.response_format in ("b64_json", None):
        stored = await services.call(services.media.get, result.media_id, now=services.clock())
        if stored is None:
            raise UnknownRequest("the image expired before it was read")
        entry["b64_json"] = base64.b64encode(stored[0]).decode("ascii")
    entry["revised_prompt"] = None
    return entry
