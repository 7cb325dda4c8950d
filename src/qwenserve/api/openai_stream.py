"""OpenAI's image streaming events for one job (``stream: true``): up to ``partial_images``
``image_generation.partial_image`` events (``image_edit.*`` for edits), then
``image_generation.completed`` with the final image, or an ``error`` event.

The previews are made by the worker from the latents (``runtime/preview.py``) and stored in the
media store under ids chosen at submit (``media/previews.py``); the worker stores each before
denoising goes on, so once the job reads as ended every preview it made is readable. The job's
ending comes from the process's one reader of the event log (``Services.feeds``: no store
poll per connection; the job is read when it starts and when it ends, and every
``FALLBACK_READ_S`` as a safety net), the next preview from the media store, so any API node
serves it whichever process runs the job. Partial images are PNG (whatever ``output_format``)
and approximate; there are fewer of them when the job has fewer steps than partial images + 1.
A caller that hangs up, or a wait past ``sync_timeout_s``, cancels the job (refunded), unless
it sent an ``Idempotency-Key``: then the job is kept for its retry.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from sse_starlette import ServerSentEvent

from qwenserve.api import jobs
from qwenserve.api.errors import openai_body
from qwenserve.api.jobs import Submitted
from qwenserve.api.openai_request import ImagesCall
from qwenserve.api.services import Services
from qwenserve.api.stream import next_events
from qwenserve.errors import Conflict, UnknownRequest, UpstreamTimeout, rebuild_error
from qwenserve.jobs import Job, JobStatus
from qwenserve.media.previews import preview_media_id
from qwenserve.store.base import ApiKey

SSE_PING_S = 15.0
FALLBACK_READ_S = 2.0
"""The longest a stream goes without reading its job itself (should an ending not reach it)."""
USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}
"""Qwen-Image counts no tokens; the field is there because OpenAI's completed event has it."""


def _event(name: str, data: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(data), event=name)


async def image_events(
    services: Services, request: Request, key: ApiKey, submitted: Submitted, call: ImagesCall
) -> AsyncIterator[ServerSentEvent]:
    """The events of one streamed job (see the module docstring)."""
    prefix = "image_edit" if call.edit else "image_generation"
    job_id = submitted.job.id
    preview_id = submitted.request.preview_id
    wanted = submitted.request.partial_images if preview_id else 0
    sent = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + services.settings.sync_timeout_s
    finished = False
    try:
        with services.feeds.watch(job_id) as feed:
            job: Job | None = await services.call(
                services.store.get_job, job_id, now=services.clock()
            )
            read_at = loop.time()
            while True:
                while sent < wanted and preview_id is not None:
                    stored = await services.call(
                        services.media.get,
                        preview_media_id(preview_id, sent),
                        now=services.clock(),
                    )
                    if stored is None:
                        break
                    yield _event(f"{prefix}.partial_image", _partial(prefix, stored[0], sent))
                    sent += 1
                if job is None or job.status.is_terminal:
                    finished = True
                    yield await _final(services, prefix, job, call)
                    return
                if loop.time() >= deadline:
                    timeout = UpstreamTimeout(
                        f"no image within {services.settings.sync_timeout_s:g}s; "
                        "the request was cancelled and refunded"
                    )
                    yield _event("error", openai_body(504, timeout.message, timeout))
                    return
                logged = await next_events(services, feed, services.settings.events_poll_s)
                if any(e.type.is_terminal for e in logged) or (
                    loop.time() - read_at >= FALLBACK_READ_S
                ):
                    job = await services.call(services.store.get_job, job_id, now=services.clock())
                    read_at = loop.time()
    finally:
        # The caller left or timed out: nobody takes the image, unless it will retry with its
        # Idempotency-Key (then the job is kept for the retry).
        if not finished and call.idempotency_key is None:
            with contextlib.suppress(Conflict, UnknownRequest):
                await asyncio.shield(jobs.cancel(services, key.id, job_id))


def _partial(prefix: str, png: bytes, index: int) -> dict[str, Any]:
    return {
        "type": f"{prefix}.partial_image",
        "b64_json": base64.b64encode(png).decode("ascii"),
        "partial_image_index": index,
        "created_at": int(time.time()),
        "output_format": "png",
        "background": "opaque",
        "quality": "auto",
        "size": "auto",
    }


async def _final(
    services: Services, prefix: str, job: Job | None, call: ImagesCall
) -> ServerSentEvent:
    if job is None:
        gone = UnknownRequest("the request expired before it finished")
        return _event("error", openai_body(404, gone.message, gone))
    if job.status is JobStatus.FAILED or job.result is None:
        error = rebuild_error(job.error_kind, job.error or "failed")
        return _event("error", openai_body(error.http_status, error.message, error))
    result = job.result
    stored = await services.call(services.media.get, result.media_id, now=services.clock())
    if stored is None:
        gone = UnknownRequest("the image expired before it was read")
        return _event("error", openai_body(404, gone.message, gone))
    return _event(
        f"{prefix}.completed",
        {
            "type": f"{prefix}.completed",
            "b64_json": base64.b64encode(stored[0]).decode("ascii"),
            "created_at": int(services.clock()),
            "output_format": call.output_format,
            "background": "opaque",
            "quality": "auto",
            "size": f"{result.width}x{result.height}",
            "usage": USAGE,
        },
    )
